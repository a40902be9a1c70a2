//! `/v1/node`: this node.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use crate::model::NodeInfo;

pub fn router() -> Router<AppState> {
    Router::new().route("/node", get(get_node))
}

/// This node: identity, version, certificate fingerprint.
#[utoipa::path(get, path = "/v1/node", tag = "node", operation_id = "node.get",
    responses((status = 200, body = NodeInfo)))]
pub async fn get_node(State(st): State<AppState>) -> Json<NodeInfo> {
    Json((*st.node).clone())
}
