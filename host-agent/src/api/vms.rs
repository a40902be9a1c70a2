//! `/v1/vms`: VMs and their operations. Operations on one VM are
//! serialized; long ones (start, shutdown) answer at once with the VM in a
//! transitional state (`starting`, `stopping`) and the client waits on its
//! state or on the events.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{if_match, AppState, ValidJson};
use crate::db::{Change, Db, Note};
use crate::error::ApiError;
use crate::model::{
    CreateVm, DesiredVmState, Image, Meta, Network, ShutdownRequest, UpdateVm, Vm, VmSpec, VmState,
    VmStatus,
};
use crate::{validate, vmm_client};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/vms", get(list).post(create))
        .route("/vms/{vm}", get(get_one).put(update).delete(remove))
        .route("/vms/{vm}/start", post(start))
        .route("/vms/{vm}/shutdown", post(shutdown))
        .route("/vms/{vm}/power-off", post(power_off))
        .route("/vms/{vm}/pause", post(pause))
        .route("/vms/{vm}/resume", post(resume))
        .route("/vms/{vm}/restart", post(restart))
}

/// Checks a spec's references: the boot image is a kernel image, each
/// network and volume exists.
fn check_refs(db: &Db, spec: &VmSpec) -> Result<(), ApiError> {
    validate::vm_spec(spec)?;
    let image: Image = db.get(&spec.boot.image).map_err(|_| {
        ApiError::invalid(format!("boot.image {:?} does not exist", spec.boot.image))
    })?;
    if !image.spec.source.is_kernel() {
        return Err(ApiError::invalid(format!(
            "boot.image {} is a disk image, not a kernel image",
            image.meta.name
        )));
    }
    for n in &spec.nics {
        db.get::<Network>(&n.network)
            .map_err(|_| ApiError::invalid(format!("network {:?} does not exist", n.network)))?;
    }
    for d in &spec.disks {
        db.get::<crate::model::Volume>(&d.volume)
            .map_err(|_| ApiError::invalid(format!("volume {:?} does not exist", d.volume)))?;
    }
    Ok(())
}

/// VMs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", operation_id = "vms.list",
    responses((status = 200, body = [Vm])))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(st.db.list::<Vm>()?))
}

/// One VM (by name or id).
#[utoipa::path(get, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vms.get",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 200, body = Vm)))]
pub async fn get_one(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(st.db.get::<Vm>(&key)?))
}

/// Defines a VM (stopped).
#[utoipa::path(post, path = "/v1/vms", tag = "vms", operation_id = "vms.create",
    request_body = CreateVm, responses((status = 201, body = Vm)))]
pub async fn create(
    State(st): State<AppState>,
    ValidJson(req): ValidJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    validate::name("vm", &req.name)?;
    check_refs(&st.db, &req.spec)?;
    let vm = Vm {
        meta: Meta::new(&req.name),
        spec: req.spec,
        desired: DesiredVmState::Stopped,
        status: VmStatus {
            state: VmState::Stopped,
            reason: None,
            pid: None,
            started_at: None,
            restarts: 0,
            nics: Vec::new(),
            disks: Vec::new(),
            cgroup: None,
        },
    };
    st.db.create(&vm, Note::new("created"))?;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Changes a stopped VM's spec. Needs the generation it was based on
/// (`If-Match` or `generation`); a stale one is refused (409).
#[utoipa::path(put, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vms.update",
    params(("vm" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    request_body = UpdateVm, responses((status = 200, body = Vm)))]
pub async fn update(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    ValidJson(req): ValidJson<UpdateVm>,
) -> Result<Json<Vm>, ApiError> {
    let expected = if_match(&headers)?.or(req.generation).ok_or_else(|| {
        ApiError::with_status(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition_required",
            "send the generation this change is based on (If-Match or \"generation\")",
        )
    })?;
    check_refs(&st.db, &req.spec)?;
    let id = st.db.get::<Vm>(&key)?.meta.id;
    let lock = st.sup.lock(&id);
    let _g = lock.lock().await;
    let vm = st.db.update(
        &id,
        Change::Desired {
            expected: Some(expected),
        },
        |v: &mut Vm| {
            if !matches!(v.status.state, VmState::Stopped | VmState::Failed) {
                return Err(ApiError::conflict(format!(
                    "VM {} is {:?}: its spec changes only while it is stopped",
                    v.meta.name, v.status.state
                )));
            }
            v.spec = req.spec.clone();
            Ok(Some(Note::new("updated")))
        },
    )?;
    Ok(Json(vm))
}

/// Deletes a stopped (or failed) VM.
#[utoipa::path(delete, path = "/v1/vms/{vm}", tag = "vms", operation_id = "vms.delete",
    params(("vm" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    responses((status = 200, body = Vm)))]
pub async fn remove(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vm>, ApiError> {
    let expected = if_match(&headers)?;
    let id = st.db.get::<Vm>(&key)?.meta.id;
    let lock = st.sup.lock(&id);
    let _g = lock.lock().await;
    let vm = st.db.delete::<Vm>(&id, expected, |v| {
        if matches!(v.status.state, VmState::Stopped | VmState::Failed) {
            Ok(())
        } else {
            Err(ApiError::conflict(format!(
                "VM {} is {:?}: stop it before deleting it",
                v.meta.name, v.status.state
            )))
        }
    })?;
    st.sup.forget(&id);
    Ok(Json(vm))
}

/// Applies one state change under the VM's lock.
async fn transition(
    st: &AppState,
    key: &str,
    headers: &HeaderMap,
    f: impl FnOnce(&mut Vm) -> Result<Note, ApiError>,
) -> Result<Vm, ApiError> {
    let expected = if_match(headers)?;
    let id = st.db.get::<Vm>(key)?.meta.id;
    let lock = st.sup.lock(&id);
    let _g = lock.lock().await;
    Ok(st
        .db
        .update(&id, Change::Desired { expected }, |v: &mut Vm| {
            f(v).map(Some)
        })?)
}

pub(super) fn wrong_state(v: &Vm, what: &str) -> ApiError {
    ApiError::conflict(format!(
        "cannot {what} VM {}: it is {}",
        v.meta.name,
        serde_json::to_value(v.status.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_string))
            .unwrap_or_default()
    ))
}

/// Starts a stopped or failed VM: answers `starting` at once.
#[utoipa::path(post, path = "/v1/vms/{vm}/start", tag = "vms", operation_id = "vms.start",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 202, body = Vm)))]
pub async fn start(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let vm = transition(&st, &key, &headers, |v| {
        if !matches!(v.status.state, VmState::Stopped | VmState::Failed) {
            return Err(wrong_state(v, "start"));
        }
        v.desired = DesiredVmState::Running;
        v.status.state = VmState::Starting;
        v.status.reason = None;
        v.status.restarts = 0;
        Ok(Note::new("state"))
    })
    .await?;
    st.sup.spawn_start(vm.meta.id.clone(), Duration::ZERO);
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

/// Shuts a VM down gracefully (its power button), powering it off after
/// `timeout_secs` (default 30). Answers `stopping` at once.
#[utoipa::path(post, path = "/v1/vms/{vm}/shutdown", tag = "vms", operation_id = "vms.shutdown",
    params(("vm" = String, Path, description = "name or id")),
    request_body(content = Option<ShutdownRequest>),
    responses((status = 202, body = Vm)))]
pub async fn shutdown(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let req: ShutdownRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ShutdownRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("bad shutdown request: {e}")))?
    };
    let timeout = req.timeout_secs.unwrap_or(30);
    if timeout > 3600 {
        return Err(ApiError::invalid("timeout_secs must be at most 3600"));
    }
    let vm = transition(&st, &key, &headers, |v| {
        if !matches!(v.status.state, VmState::Running | VmState::Paused) {
            return Err(wrong_state(v, "shut down"));
        }
        v.desired = DesiredVmState::Stopped;
        v.status.state = VmState::Stopping;
        Ok(Note::with(
            "state",
            format!("graceful shutdown, power-off after {timeout} s"),
        ))
    })
    .await?;
    if let Some(pid) = vm.status.pid {
        st.sup
            .spawn_shutdown(vm.meta.id.clone(), pid, Duration::from_secs(timeout));
    }
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

/// Powers a VM off at once.
#[utoipa::path(post, path = "/v1/vms/{vm}/power-off", tag = "vms", operation_id = "vms.power_off",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 202, body = Vm)))]
pub async fn power_off(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let vm = transition(&st, &key, &headers, |v| {
        if !matches!(
            v.status.state,
            VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting
        ) {
            return Err(wrong_state(v, "power off"));
        }
        v.desired = DesiredVmState::Stopped;
        if v.status.pid.is_some() {
            v.status.state = VmState::Stopping;
        } else {
            // Not launched yet (a pending restart): nothing to stop.
            v.status.state = VmState::Stopped;
        }
        Ok(Note::with("state", "power-off"))
    })
    .await?;
    if let Some(pid) = vm.status.pid {
        st.sup.force_off(pid, &st.sup.api_socket(&vm.meta.id)).await;
    }
    Ok((StatusCode::ACCEPTED, Json(vm)))
}

/// An operation kiln-vmm carries out: its name there, the state it needs,
/// and the observed and desired states after it.
struct VmOp {
    op: &'static str,
    from: VmState,
    to: VmState,
    desired: DesiredVmState,
}

const PAUSE: VmOp = VmOp {
    op: "pause",
    from: VmState::Running,
    to: VmState::Paused,
    desired: DesiredVmState::Paused,
};
const RESUME: VmOp = VmOp {
    op: "resume",
    from: VmState::Paused,
    to: VmState::Running,
    desired: DesiredVmState::Running,
};
const REBOOT: VmOp = VmOp {
    op: "reboot",
    from: VmState::Running,
    to: VmState::Running,
    desired: DesiredVmState::Running,
};

async fn vmm_op(
    st: &AppState,
    key: &str,
    headers: &HeaderMap,
    VmOp {
        op,
        from,
        to,
        desired,
    }: VmOp,
) -> Result<Json<Vm>, ApiError> {
    let expected = if_match(headers)?;
    let id = st.db.get::<Vm>(key)?.meta.id;
    let lock = st.sup.lock(&id);
    let _g = lock.lock().await;
    let vm = st.db.get::<Vm>(&id)?;
    if vm.status.state != from {
        return Err(wrong_state(&vm, op));
    }
    vmm_client::action(&st.sup.api_socket(&id), op)
        .await
        .map_err(|e| ApiError::conflict(format!("{e:#}")))?;
    Ok(Json(st.db.update(
        &id,
        Change::Desired { expected },
        |v: &mut Vm| {
            v.status.state = to;
            v.desired = desired;
            Ok(Some(Note::new("state")))
        },
    )?))
}

/// Pauses a running VM (its vCPUs stop; memory stays).
#[utoipa::path(post, path = "/v1/vms/{vm}/pause", tag = "vms", operation_id = "vms.pause",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 200, body = Vm)))]
pub async fn pause(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vm>, ApiError> {
    vmm_op(&st, &key, &headers, PAUSE).await
}

/// Resumes a paused VM.
#[utoipa::path(post, path = "/v1/vms/{vm}/resume", tag = "vms", operation_id = "vms.resume",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 200, body = Vm)))]
pub async fn resume(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vm>, ApiError> {
    vmm_op(&st, &key, &headers, RESUME).await
}

/// Reboots a running VM (a reset, in the same kiln-vmm).
#[utoipa::path(post, path = "/v1/vms/{vm}/restart", tag = "vms", operation_id = "vms.restart",
    params(("vm" = String, Path, description = "name or id")),
    responses((status = 200, body = Vm)))]
pub async fn restart(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Vm>, ApiError> {
    vmm_op(&st, &key, &headers, REBOOT).await
}
