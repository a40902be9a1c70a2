//! `/v1/networks`: a named network is a Linux bridge, optionally with an
//! uplink (or a VLAN on it) and an address for the node.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};

use super::{if_match, AppState, ValidJson};
use crate::db::Note;
use crate::error::ApiError;
use crate::model::{CreateNetwork, Meta, Network, NetworkState, NetworkStatus, Vm};
use crate::{netdev, validate};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/networks", get(list).post(create))
        .route("/networks/{network}", get(get_one).delete(remove))
}

/// Networks.
#[utoipa::path(get, path = "/v1/networks", tag = "networks", operation_id = "networks.list",
    responses((status = 200, body = [Network])))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Network>>, ApiError> {
    Ok(Json(st.db.list::<Network>()?))
}

/// One network (by name or id).
#[utoipa::path(get, path = "/v1/networks/{network}", tag = "networks", operation_id = "networks.get",
    params(("network" = String, Path, description = "name or id")),
    responses((status = 200, body = Network)))]
pub async fn get_one(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(st.db.get::<Network>(&key)?))
}

/// Creates a network and its bridge.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", operation_id = "networks.create",
    request_body = CreateNetwork, responses((status = 201, body = Network)))]
pub async fn create(
    State(st): State<AppState>,
    ValidJson(req): ValidJson<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    validate::name("network", &req.name)?;
    let s = &req.spec;
    let bridge = match &s.bridge {
        Some(b) => b.clone(),
        None => {
            let b = format!("kb-{}", req.name);
            if b.len() > 15 {
                return Err(ApiError::invalid(format!(
                    "network name {:?} is too long for a bridge name: set spec.bridge (at most 15 characters)",
                    req.name
                )));
            }
            b
        }
    };
    validate::ifname("bridge", &bridge)?;
    if let Some(u) = &s.uplink {
        validate::ifname("uplink", u)?;
    }
    match (s.vlan, &s.uplink) {
        (Some(v), _) if v == 0 || v > 4094 => return Err(ApiError::invalid("vlan must be 1-4094")),
        (Some(_), None) => return Err(ApiError::invalid("vlan needs an uplink")),
        _ => {}
    }
    if let Some(a) = &s.address {
        validate::cidr(a)?;
    }
    if st
        .db
        .list::<Network>()?
        .iter()
        .any(|n| n.status.bridge == bridge)
    {
        return Err(ApiError::conflict(format!(
            "bridge {bridge} belongs to another network"
        )));
    }
    if st.db.get::<Network>(&req.name).is_ok() {
        return Err(ApiError::conflict(format!(
            "a network named {:?} exists",
            req.name
        )));
    }
    netdev::create_bridge(&bridge, s.address.as_deref(), s.uplink.as_deref(), s.vlan)
        .await
        .map_err(|e| ApiError::conflict(format!("{e:#}")))?;
    let net = Network {
        meta: Meta::new(&req.name),
        spec: req.spec.clone(),
        status: NetworkStatus {
            state: NetworkState::Ready,
            bridge: bridge.clone(),
            reason: None,
        },
    };
    if let Err(e) = st.db.create(&net, Note::new("created")) {
        let _ = netdev::delete_bridge(&bridge, s.uplink.as_deref(), s.vlan).await;
        return Err(e.into());
    }
    Ok((StatusCode::CREATED, Json(net)))
}

/// Deletes a network no VM uses, and its bridge.
#[utoipa::path(delete, path = "/v1/networks/{network}", tag = "networks", operation_id = "networks.delete",
    params(("network" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    responses((status = 200, body = Network)))]
pub async fn remove(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Network>, ApiError> {
    let expected = if_match(&headers)?;
    let vms = st.db.list::<Vm>()?;
    let net = st.db.delete::<Network>(&key, expected, |n| {
        match vms.iter().find(|v| {
            v.spec
                .nics
                .iter()
                .any(|nic| nic.network == n.meta.name || nic.network == n.meta.id)
        }) {
            Some(v) => Err(ApiError::conflict(format!(
                "network {} is in use by VM {}",
                n.meta.name, v.meta.name
            ))),
            None => Ok(()),
        }
    })?;
    if let Err(e) = netdev::delete_bridge(
        &net.status.bridge,
        net.spec.uplink.as_deref(),
        net.spec.vlan,
    )
    .await
    {
        tracing::warn!(
            "network {} deleted, but its bridge stays: {e:#}",
            net.meta.name
        );
    }
    Ok(Json(net))
}
