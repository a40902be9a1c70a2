//! `/v1/node/trust`, `/v1/node/attestation`, unlocking and resealing the
//! KEK, and `/v1/policies/images`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, if_match, AppState, ValidJson, ValidQuery};
use crate::db::{Change, Note};
use crate::error::ApiError;
use crate::model::{ImagePolicy, UpdateImagePolicy, IMAGE_POLICY};
use crate::trust::{TrustError, TrustStatus};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/node/trust", get(status))
        .route("/node/attestation", get(attestation))
        .route("/node/unlock", post(unlock))
        .route("/node/reseal", post(reseal))
        .route("/node/rotate-kek", post(rotate_kek))
        .route("/policies/images", get(get_policy).put(put_policy))
}

impl From<TrustError> for ApiError {
    fn from(e: TrustError) -> Self {
        match e {
            TrustError::Locked(_) => ApiError::conflict(e.to_string()),
            TrustError::BadInput(m) => ApiError::invalid(m),
            TrustError::Failed(m) => ApiError::internal(m),
        }
    }
}

/// The node's TPM, measurement mode and whether its encrypted volumes are
/// locked (and why).
#[utoipa::path(get, path = "/v1/node/trust", tag = "node", operation_id = "node.trust",
    responses((status = 200, body = TrustStatus)))]
pub async fn status(State(st): State<AppState>) -> Json<TrustStatus> {
    Json(st.trust.status())
}

#[derive(Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AttestationQuery {
    /// The verifier's fresh challenge, 1–64 bytes in hex.
    pub nonce: String,
}

/// A TPM quote over PCRs 0–7, 10, 14 and 15 answering the nonce, signed by
/// the node's attestation key, with the event logs that explain it
/// (verify with `kilnctl attest verify` or `tpm2_checkquote`).
#[utoipa::path(get, path = "/v1/node/attestation", tag = "node", operation_id = "node.attestation",
    params(AttestationQuery),
    responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn attestation(
    State(st): State<AppState>,
    ValidQuery(q): ValidQuery<AttestationQuery>,
) -> Result<Json<crate::attest::Evidence>, ApiError> {
    let nonce = hex::decode(q.nonce.trim())
        .map_err(|_| ApiError::bad_request("nonce must be hex (1 to 64 bytes)"))?;
    let node = crate::attest::EvidenceNode {
        id: st.node.id.clone(),
        name: st.node.name.clone(),
    };
    let trust = st.trust.clone();
    let ev = blocking(move || Ok(trust.evidence(node, &nonce)?)).await?;
    Ok(Json(ev))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Unlock {
    /// The recovery key shown at `kiln-agent init` (64 hex digits).
    pub recovery_key: String,
}

/// Unlocks encrypted volumes with the recovery key when the KEK did not
/// unseal (the measurements changed). Reseal afterwards if the change was
/// approved.
#[utoipa::path(post, path = "/v1/node/unlock", tag = "node", operation_id = "node.unlock",
    request_body = Unlock, responses((status = 200, body = TrustStatus)))]
pub async fn unlock(
    State(st): State<AppState>,
    ValidJson(body): ValidJson<Unlock>,
) -> Result<Json<TrustStatus>, ApiError> {
    let trust = st.trust.clone();
    let r = blocking(move || Ok(trust.unlock(&body.recovery_key)?)).await;
    let ok = r.is_ok();
    let _ = st.db.node_event(
        &st.node,
        "trust",
        Note::with(
            "unlock",
            if ok {
                "encrypted volumes unlocked with the recovery key"
            } else {
                "a wrong recovery key was given"
            },
        ),
    );
    r?;
    Ok(Json(st.trust.status()))
}

/// Seals the KEK to the node's measurements as they are now (after an
/// approved update), and to what the next boot will measure.
#[utoipa::path(post, path = "/v1/node/reseal", tag = "node", operation_id = "node.reseal",
    responses((status = 200, body = TrustStatus)))]
pub async fn reseal(State(st): State<AppState>) -> Result<Json<TrustStatus>, ApiError> {
    let trust = st.trust.clone();
    blocking(move || Ok(trust.reseal()?)).await?;
    let _ = st.db.node_event(
        &st.node,
        "trust",
        Note::with("reseal", "the KEK was sealed to the current measurements"),
    );
    Ok(Json(st.trust.status()))
}

#[derive(Serialize, ToSchema)]
pub struct RotatedKek {
    pub kek_id: String,
    /// The new recovery key, shown only here: the old one no longer works.
    pub recovery_key: String,
    /// How many volume keys were wrapped again.
    pub volume_keys: usize,
}

/// A new KEK: every volume key is wrapped again by it (no data is
/// touched), it is sealed, and a new recovery key is returned once.
#[utoipa::path(post, path = "/v1/node/rotate-kek", tag = "node", operation_id = "node.rotate_kek",
    responses((status = 200, body = RotatedKek)))]
pub async fn rotate_kek(State(st): State<AppState>) -> Result<Json<RotatedKek>, ApiError> {
    let (trust, db) = (st.trust.clone(), st.db.clone());
    let (recovery_key, n) = blocking(move || {
        let mut n = 0;
        let rk = trust.rotate_kek(&mut |rewrap| {
            let keys = db
                .volume_keys()
                .map_err(|e| TrustError::Failed(e.to_string()))?;
            let mut out = Vec::new();
            for (id, w) in keys {
                let purpose =
                    crate::trust::Trust::volume_purpose(crate::volume_keys::volume_of(&id));
                out.push((id, Some(rewrap(&w, &purpose)?)));
            }
            n = out.len();
            db.set_volume_keys(&out)
                .map_err(|e| TrustError::Failed(e.to_string()))
        })?;
        Ok((rk, n))
    })
    .await?;
    let status = st.trust.status();
    let _ = st.db.node_event(
        &st.node,
        "trust",
        Note::with(
            "rotate-kek",
            format!("a new KEK {} wraps {n} volume keys", status.kek_id),
        ),
    );
    Ok(Json(RotatedKek {
        kek_id: status.kek_id,
        recovery_key,
        volume_keys: n,
    }))
}

/// The image policy: `audit` (default) or `enforce`, and the approved
/// image digests.
#[utoipa::path(get, path = "/v1/policies/images", tag = "policies", operation_id = "policies.images.get",
    responses((status = 200, body = ImagePolicy)))]
pub async fn get_policy(State(st): State<AppState>) -> Result<Json<ImagePolicy>, ApiError> {
    Ok(Json(crate::image_policy::current(&st.db)?))
}

/// Replaces the image policy (admins only; an event records the change).
#[utoipa::path(put, path = "/v1/policies/images", tag = "policies", operation_id = "policies.images.put",
    request_body = UpdateImagePolicy, responses((status = 200, body = ImagePolicy)))]
pub async fn put_policy(
    State(st): State<AppState>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<UpdateImagePolicy>,
) -> Result<(StatusCode, Json<ImagePolicy>), ApiError> {
    let expected = if_match(&headers)?.or(body.generation);
    let mut spec = body.spec;
    for a in &mut spec.approved {
        a.sha256 = a.sha256.trim().to_ascii_lowercase();
        if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::invalid(format!(
                "approved digest {:?} is not a hex SHA-256 (64 digits)",
                a.sha256
            )));
        }
    }
    spec.approved.sort();
    spec.approved.dedup_by(|a, b| a.sha256 == b.sha256);
    crate::image_policy::current(&st.db)?;
    let p = st.db.update(
        IMAGE_POLICY,
        Change::Desired { expected },
        |p: &mut ImagePolicy| {
            let msg = format!(
                "mode {} -> {}, approved digests {} -> {}",
                p.spec.mode.as_str(),
                spec.mode.as_str(),
                p.spec.approved.len(),
                spec.approved.len()
            );
            p.spec = spec;
            Ok(Some(Note::with("updated", msg)))
        },
    )?;
    Ok((StatusCode::OK, Json(p)))
}
