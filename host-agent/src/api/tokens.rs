//! `/v1/tokens`: API tokens. A token's value is shown once, when it is
//! made; revoking deletes it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};

use super::{AppState, ValidJson};
use crate::db::Note;
use crate::error::ApiError;
use crate::model::{CreateToken, NewToken, Token, TokenInfo};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tokens", get(list).post(create))
        .route("/tokens/{token}", delete(revoke))
}

/// API tokens (never their values).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", operation_id = "tokens.list",
    responses((status = 200, body = [TokenInfo])))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(
        st.db
            .list::<Token>()?
            .into_iter()
            .map(TokenInfo::from)
            .collect(),
    ))
}

/// Makes a token; its value is in this response only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", operation_id = "tokens.create",
    request_body = CreateToken, responses((status = 201, body = NewToken)))]
pub async fn create(
    State(st): State<AppState>,
    ValidJson(req): ValidJson<CreateToken>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    crate::validate::name("token", &req.name)?;
    let (token, value) = crate::auth::generate(&req.name, req.spec.role);
    st.db.create(&token, Note::new("created"))?;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            info: token.into(),
            token: value,
        }),
    ))
}

/// Revokes a token (by name or id): it stops working at once.
#[utoipa::path(delete, path = "/v1/tokens/{token}", tag = "tokens", operation_id = "tokens.revoke",
    params(("token" = String, Path, description = "name or id")),
    responses((status = 200, body = TokenInfo)))]
pub async fn revoke(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    Ok(Json(st.db.delete::<Token>(&key, None, |_| Ok(()))?.into()))
}
