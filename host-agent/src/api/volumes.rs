//! `/v1/volumes`: replicated block volumes in the node's kiln-store: blank,
//! copied from a disk image, or cloned from a snapshot; resized,
//! snapshotted, deleted. Creating one answers at once (`creating`); the
//! copy or clone runs in the background.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kiln_store::proto::Request;

use super::{blocking, if_match, AppState, ValidJson};
use crate::db::{Change, Db, Note};
use crate::error::ApiError;
use crate::model::{
    CreateSnapshot, CreateVolume, FileRole, Image, ImageState, Meta, ReplicaHealth, ResizeVolume,
    Vm, VmState, Volume, VolumeSource, VolumeState, VolumeStatus,
};
use crate::store::Store;
use crate::trust::Trust;
use crate::validate;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/volumes", get(list).post(create))
        .route("/volumes/{volume}", get(get_one).delete(remove))
        .route("/volumes/{volume}/resize", post(resize))
        .route("/volumes/{volume}/snapshots", post(snapshot))
        .route("/volumes/{volume}/rekey", post(rekey))
        .route(
            "/volumes/{volume}/snapshots/{snapshot}",
            delete(delete_snapshot),
        )
}

const BLOCK: u64 = 4096;
const MAX_SIZE: u64 = kiln_store::MAX_VOLUME_SIZE;

fn check_size(size: u64) -> Result<(), ApiError> {
    if size == 0 || size % BLOCK != 0 || size > MAX_SIZE {
        return Err(ApiError::invalid(format!(
            "size_bytes must be a non-zero multiple of {BLOCK} up to {MAX_SIZE}, not {size}"
        )));
    }
    Ok(())
}

/// The store changes a volume through its writer: attach it here first
/// (idempotent; a VM that stopped has detached it).
fn as_writer(db: &Db, trust: &Trust, store: &Store, v: &Volume) -> Result<(), ApiError> {
    store
        .call(&crate::volume_keys::attach_request(db, trust, v)?)
        .map(|_| ())
}

/// A volume that is `ready` (409 otherwise).
fn ready_volume(db: &Db, key: &str) -> Result<Volume, ApiError> {
    let v: Volume = db.get(key)?;
    if v.status.state != VolumeState::Ready {
        return Err(ApiError::conflict(format!(
            "volume {} is not ready",
            v.meta.name
        )));
    }
    Ok(v)
}

/// The VM whose spec uses this volume, if any.
fn user(db: &Db, v: &Volume) -> Result<Option<Vm>, ApiError> {
    Ok(db.list::<Vm>()?.into_iter().find(|vm| {
        vm.spec
            .disks
            .iter()
            .any(|d| d.volume == v.meta.name || d.volume == v.meta.id)
    }))
}

/// Observed replica health and snapshots, from the store.
fn refresh(db: &Db, store: &Store, name: &str) -> Result<Volume, ApiError> {
    let v: Volume = db.get(name)?;
    if v.status.state != VolumeState::Ready {
        return Ok(v);
    }
    let Ok(s) = store.status(&v.meta.name) else {
        return Ok(v);
    };
    Ok(db.update(&v.meta.id, Change::Observed, |v: &mut Volume| {
        v.status.replicas = s
            .replicas
            .iter()
            .map(|r| ReplicaHealth {
                node: r.node.clone(),
                state: r.state.clone(),
            })
            .collect();
        v.status.snapshots = s.snapshots.clone();
        v.status.encrypted = s.encrypted;
        v.status.key_check = s.key_check.clone();
        if v.status.rekey.is_none() {
            v.status.rekey = s.rekey.as_ref().map(|r| crate::model::RekeyProgress {
                done: r.done,
                total: r.total,
            });
        }
        Ok(None)
    })?)
}

/// Volumes.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", operation_id = "volumes.list",
    responses((status = 200, body = [Volume])))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(st.db.list::<Volume>()?))
}

/// One volume (by name or id), with its replicas' health.
#[utoipa::path(get, path = "/v1/volumes/{volume}", tag = "volumes", operation_id = "volumes.get",
    params(("volume" = String, Path, description = "name or id")),
    responses((status = 200, body = Volume)))]
pub async fn get_one(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    let (db, store) = (st.db.clone(), st.store.clone());
    Ok(Json(blocking(move || refresh(&db, &store, &key)).await?))
}

/// Creates a volume: answers `creating`; it becomes `ready` or `failed`.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", operation_id = "volumes.create",
    request_body = CreateVolume, responses((status = 202, body = Volume)))]
pub async fn create(
    State(st): State<AppState>,
    ValidJson(req): ValidJson<CreateVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    validate::name("volume", &req.name)?;
    check_size(req.spec.size_bytes)?;
    match &req.spec.source {
        VolumeSource::Blank => {}
        VolumeSource::Image { image } => {
            let i: Image = st
                .db
                .get(image)
                .map_err(|_| ApiError::invalid(format!("image {image:?} does not exist")))?;
            let Some(f) = i
                .file(FileRole::Disk)
                .filter(|_| i.status.state == ImageState::Ready)
            else {
                return Err(ApiError::invalid(format!(
                    "image {} is not a ready disk image",
                    i.meta.name
                )));
            };
            if f.size > req.spec.size_bytes {
                return Err(ApiError::invalid(format!(
                    "image {} holds {} bytes: size_bytes must be at least that",
                    i.meta.name, f.size
                )));
            }
        }
        VolumeSource::Snapshot { volume, snapshot } => {
            let v: Volume = st
                .db
                .get(volume)
                .map_err(|_| ApiError::invalid(format!("volume {volume:?} does not exist")))?;
            validate::name("snapshot", snapshot)?;
            if v.spec.size_bytes != req.spec.size_bytes {
                return Err(ApiError::invalid(format!(
                    "a clone has its source's size: size_bytes must be {}",
                    v.spec.size_bytes
                )));
            }
        }
    }
    let vol = Volume {
        meta: Meta::new(&req.name),
        spec: req.spec,
        status: VolumeStatus {
            state: VolumeState::Creating,
            reason: None,
            bytes_done: 0,
            replicas: Vec::new(),
            snapshots: Vec::new(),
            encrypted: true,
            key_check: None,
            rekey: None,
        },
    };
    st.db.create(&vol, Note::new("created"))?;
    let (db, store, paths, trust, id) = (
        st.db.clone(),
        st.store.clone(),
        st.paths.clone(),
        st.trust.clone(),
        vol.meta.id.clone(),
    );
    tokio::task::spawn_blocking(move || build(db, store, paths, trust, id));
    Ok((StatusCode::ACCEPTED, Json(vol)))
}

/// Makes the volume in the store and fills it; records the outcome.
fn build(
    db: Arc<Db>,
    store: Arc<Store>,
    paths: crate::paths::Paths,
    trust: Arc<Trust>,
    id: String,
) {
    let Ok(v) = db.get::<Volume>(&id) else { return };
    let name = v.meta.name.clone();
    let result = (|| -> Result<(), ApiError> {
        match &v.spec.source {
            VolumeSource::Snapshot { volume, snapshot } => {
                let src: Volume = db.get(volume)?;
                crate::volume_keys::share(&db, &trust, &src, &v)?;
                store.call(&Request::VolClone {
                    name: src.meta.name,
                    snap: snapshot.clone(),
                    new: name.clone(),
                })?;
            }
            source => {
                let key = crate::volume_keys::create(&db, &trust, &v)?;
                store.call(&Request::VolCreate {
                    name: name.clone(),
                    size: v.spec.size_bytes,
                    replicas: vec![store.replica()],
                    key: Some(key),
                })?;
                if let VolumeSource::Image { image } = source {
                    let i: Image = db.get(image)?;
                    let blob = crate::images::blob(&paths, &i, FileRole::Disk)
                        .ok_or_else(|| ApiError::invalid("the image has no disk file"))?;
                    copy_in(&db, &store, &id, &name, &blob)?;
                }
            }
        }
        Ok(())
    })();
    let _ = db.update(&id, Change::Observed, |v: &mut Volume| {
        match &result {
            Ok(()) => {
                v.status.state = VolumeState::Ready;
                v.status.reason = None;
            }
            Err(e) => {
                v.status.state = VolumeState::Failed;
                v.status.reason = Some(e.message.clone());
            }
        }
        Ok(Some(Note::new("state")))
    });
    if result.is_ok() {
        let _ = refresh(&db, &store, &id);
    }
}

/// Writes a disk image into the volume, skipping zero chunks (the volume
/// starts as zeros), reporting progress.
fn copy_in(
    db: &Db,
    store: &Store,
    id: &str,
    name: &str,
    blob: &std::path::Path,
) -> Result<(), ApiError> {
    use kiln_store::VolumeIo;
    use std::io::Read;
    let vc = kiln_store::VolumeClient::open(&store.socket, name)
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let mut f = std::fs::File::open(blob).map_err(ApiError::internal)?;
    let mut buf = vec![0u8; kiln_store::MAX_IO as usize];
    let mut off = 0u64;
    let mut last = std::time::Instant::now();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).map_err(ApiError::internal)? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        let len = n.div_ceil(BLOCK as usize) * BLOCK as usize;
        buf[n..len].fill(0);
        if buf[..len].iter().any(|b| *b != 0) {
            vc.write_at(&buf[..len], off).map_err(|e| {
                ApiError::conflict(format!("writing the image into the volume: {e}"))
            })?;
        }
        off += n as u64;
        if last.elapsed().as_millis() > 500 {
            last = std::time::Instant::now();
            let _ = db.update(id, Change::Observed, |v: &mut Volume| {
                v.status.bytes_done = off;
                Ok(None)
            });
        }
    }
    vc.flush()
        .map_err(|e| ApiError::conflict(format!("flushing the volume: {e}")))?;
    let _ = db.update(id, Change::Observed, |v: &mut Volume| {
        v.status.bytes_done = off;
        Ok(None)
    });
    Ok(())
}

/// Deletes a volume no VM uses, with its snapshots, on every replica.
#[utoipa::path(delete, path = "/v1/volumes/{volume}", tag = "volumes", operation_id = "volumes.delete",
    params(("volume" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    responses((status = 200, body = Volume)))]
pub async fn remove(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Volume>, ApiError> {
    let expected = if_match(&headers)?;
    let (db, store, trust) = (st.db.clone(), st.store.clone(), st.trust.clone());
    Ok(Json(
        blocking(move || {
            let v: Volume = db.get(&key)?;
            if let Some(vm) = user(&db, &v)? {
                return Err(ApiError::conflict(format!(
                    "volume {} is a disk of VM {}",
                    v.meta.name, vm.meta.name
                )));
            }
            if v.status.state == VolumeState::Creating {
                return Err(ApiError::conflict(format!(
                    "volume {} is still being created",
                    v.meta.name
                )));
            }
            if let Some(e) = expected {
                if e != v.meta.generation {
                    return Err(crate::db::DbError::Stale {
                        expected: e,
                        actual: v.meta.generation,
                    }
                    .into());
                }
            }
            let deleted = as_writer(&db, &trust, &store, &v).and_then(|_| {
                store.call(&Request::VolDelete {
                    name: v.meta.name.clone(),
                })
            });
            match deleted {
                Ok(_) => {}
                // Never made (a failed create): only the record goes.
                Err(e) if e.status == StatusCode::NOT_FOUND => {}
                Err(e) => return Err(e),
            }
            let gone = db.delete::<Volume>(&v.meta.id, None, |_| Ok(()))?;
            crate::volume_keys::forget(&db, &gone.meta.id)?;
            Ok(gone)
        })
        .await?,
    ))
}

fn not_running_user(db: &Db, v: &Volume) -> Result<(), ApiError> {
    if let Some(vm) = user(db, v)? {
        if !matches!(vm.status.state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::conflict(format!(
                "volume {} is a disk of running VM {}: stop it first",
                v.meta.name, vm.meta.name
            )));
        }
    }
    Ok(())
}

/// Grows or shrinks a volume no running VM uses.
#[utoipa::path(post, path = "/v1/volumes/{volume}/resize", tag = "volumes", operation_id = "volumes.resize",
    params(("volume" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    request_body = ResizeVolume, responses((status = 200, body = Volume)))]
pub async fn resize(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    ValidJson(req): ValidJson<ResizeVolume>,
) -> Result<Json<Volume>, ApiError> {
    let expected = if_match(&headers)?.or(req.generation);
    check_size(req.size_bytes)?;
    let (db, store, trust) = (st.db.clone(), st.store.clone(), st.trust.clone());
    Ok(Json(
        blocking(move || {
            let v: Volume = db.get(&key)?;
            not_running_user(&db, &v)?;
            if v.status.state != VolumeState::Ready {
                return Err(ApiError::conflict(format!(
                    "volume {} is not ready",
                    v.meta.name
                )));
            }
            if let Some(e) = expected.filter(|e| *e != v.meta.generation) {
                return Err(crate::db::DbError::Stale {
                    expected: e,
                    actual: v.meta.generation,
                }
                .into());
            }
            as_writer(&db, &trust, &store, &v)?;
            store.call(&Request::VolResize {
                name: v.meta.name.clone(),
                size: req.size_bytes,
            })?;
            Ok(db.update(
                &v.meta.id,
                Change::Desired { expected },
                |v: &mut Volume| {
                    v.spec.size_bytes = req.size_bytes;
                    Ok(Some(Note::with(
                        "updated",
                        format!("resized to {} bytes", req.size_bytes),
                    )))
                },
            )?)
        })
        .await?,
    ))
}

/// Takes a point-in-time snapshot of a volume.
#[utoipa::path(post, path = "/v1/volumes/{volume}/snapshots", tag = "volumes", operation_id = "volumes.snapshot",
    params(("volume" = String, Path, description = "name or id")),
    request_body = CreateSnapshot, responses((status = 201, body = Volume)))]
pub async fn snapshot(
    State(st): State<AppState>,
    Path(key): Path<String>,
    ValidJson(req): ValidJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    validate::name("snapshot", &req.name)?;
    let (db, store, trust) = (st.db.clone(), st.store.clone(), st.trust.clone());
    let v = blocking(move || {
        let v = ready_volume(&db, &key)?;
        if v.status.snapshots.contains(&req.name) {
            return Err(ApiError::conflict(format!(
                "volume {} has a snapshot {}",
                v.meta.name, req.name
            )));
        }
        as_writer(&db, &trust, &store, &v)?;
        store.call(&Request::VolSnapshot {
            name: v.meta.name.clone(),
            snap: req.name.clone(),
        })?;
        db.update(&v.meta.id, Change::Observed, |v: &mut Volume| {
            v.status.snapshots.push(req.name.clone());
            Ok(Some(Note::with(
                "updated",
                format!("snapshot {}", req.name),
            )))
        })?;
        refresh(&db, &store, &v.meta.id)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Deletes a snapshot.
#[utoipa::path(delete, path = "/v1/volumes/{volume}/snapshots/{snapshot}", tag = "volumes",
    operation_id = "volumes.delete_snapshot",
    params(("volume" = String, Path, description = "name or id"), ("snapshot" = String, Path)),
    responses((status = 200, body = Volume)))]
pub async fn delete_snapshot(
    State(st): State<AppState>,
    Path((key, snap)): Path<(String, String)>,
) -> Result<Json<Volume>, ApiError> {
    let (db, store, trust) = (st.db.clone(), st.store.clone(), st.trust.clone());
    Ok(Json(
        blocking(move || {
            let v: Volume = db.get(&key)?;
            if !v.status.snapshots.contains(&snap) {
                return Err(ApiError::not_found(format!(
                    "volume {} has no snapshot {snap:?}",
                    v.meta.name
                )));
            }
            as_writer(&db, &trust, &store, &v)?;
            store.call(&Request::VolDeleteSnapshot {
                name: v.meta.name.clone(),
                snap: snap.clone(),
            })?;
            db.update(&v.meta.id, Change::Observed, |v: &mut Volume| {
                v.status.snapshots.retain(|s| *s != snap);
                Ok(Some(Note::with(
                    "updated",
                    format!("snapshot {snap} deleted"),
                )))
            })?;
            refresh(&db, &store, &v.meta.id)
        })
        .await?,
    ))
}

/// For the VM supervisor: the store names of a spec's volumes, all ready.
pub fn ready_volumes(db: &Db, spec: &crate::model::VmSpec) -> Result<Vec<String>, String> {
    spec.disks
        .iter()
        .map(|d| {
            let v: Volume = db
                .get(&d.volume)
                .map_err(|_| format!("volume {:?} does not exist", d.volume))?;
            if v.status.state != VolumeState::Ready {
                return Err(format!("volume {} is not ready", v.meta.name));
            }
            Ok(v.meta.name)
        })
        .collect()
}

/// Re-encrypts a volume with a new key, online (its VM keeps running):
/// answers at once; `status.rekey` shows progress until it is done.
/// Refused while the volume has snapshots (their blocks use the old key).
#[utoipa::path(post, path = "/v1/volumes/{volume}/rekey", tag = "volumes", operation_id = "volumes.rekey",
    params(("volume" = String, Path, description = "name or id")),
    responses((status = 202, body = Volume)))]
pub async fn rekey(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let (db, store, trust) = (st.db.clone(), st.store.clone(), st.trust.clone());
    let v = blocking(move || {
        let v = ready_volume(&db, &key)?;
        if db.volume_key(&v.meta.id)?.is_none() {
            return Err(ApiError::conflict(format!(
                "volume {} is not encrypted",
                v.meta.name
            )));
        }
        if v.status.rekey.is_some() {
            return Err(ApiError::conflict(format!(
                "volume {} is being rekeyed already",
                v.meta.name
            )));
        }
        if !v.status.snapshots.is_empty() {
            return Err(ApiError::conflict(format!(
                "volume {} has snapshots, whose blocks use its current key: delete them first",
                v.meta.name
            )));
        }
        // Attach with the current key before a next one exists.
        as_writer(&db, &trust, &store, &v)?;
        let (dek, w) = trust.new_volume_key(&v.meta.id).map_err(ApiError::from)?;
        db.set_volume_keys(&[(crate::volume_keys::next_slot(&v.meta.id), Some(w))])?;
        let new = crate::volume_keys::store_key(&dek)?;
        let v = db.update(&v.meta.id, Change::Observed, |v: &mut Volume| {
            v.status.rekey = Some(crate::model::RekeyProgress {
                done: 0,
                total: v.spec.size_bytes,
            });
            Ok(Some(Note::with(
                "rekey",
                "re-encryption with a new key started",
            )))
        })?;
        let (db2, id, name) = (db.clone(), v.meta.id.clone(), v.meta.name.clone());
        std::thread::spawn(move || run_rekey(&db2, &store, &id, &name, new));
        Ok(v)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

fn run_rekey(db: &Db, store: &Store, id: &str, name: &str, key: kiln_store::crypt::VolumeKey) {
    let mut last = std::time::Instant::now();
    let r = store.call_with_progress(
        &Request::VolRekey {
            name: name.to_string(),
            key,
        },
        &mut |p| {
            if last.elapsed().as_millis() >= 500 {
                last = std::time::Instant::now();
                let _ = db.update(id, Change::Observed, |v: &mut Volume| {
                    v.status.rekey = Some(crate::model::RekeyProgress {
                        done: p.done,
                        total: p.total,
                    });
                    Ok(None)
                });
            }
        },
    );
    let next = crate::volume_keys::next_slot(id);
    let note = match &r {
        Ok(_) => match db.volume_key(&next) {
            Ok(Some(w)) => match db.set_volume_keys(&[(id.to_string(), Some(w)), (next, None)]) {
                Ok(()) => Note::with("rekey", "re-encrypted with a new key"),
                Err(e) => Note::with(
                    "rekey",
                    format!("re-encrypted, but the new key was not recorded: {e}"),
                ),
            },
            _ => Note::with("rekey", "re-encrypted, but the new key went missing"),
        },
        Err(e) => Note::with(
            "rekey",
            format!(
                "re-encryption stopped: {}; it resumes when the volume is attached again",
                e.message
            ),
        ),
    };
    let failed = r.as_ref().err().map(|e| {
        format!(
            "the rekey stopped: {}; it resumes when the volume is attached again",
            e.message
        )
    });
    let _ = db.update(id, Change::Observed, |v: &mut Volume| {
        v.status.rekey = None;
        v.status.reason = failed;
        Ok(Some(note))
    });
    let _ = refresh(db, store, id);
}
