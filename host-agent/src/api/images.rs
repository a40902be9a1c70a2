//! `/v1/images`: kernels (with initramfs) and disk images, imported from a
//! path on the node, content-addressed by SHA-256 and deduplicated.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use axum::{Json, Router};

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde::Deserialize;

use super::{blocking, if_match, AppState, ValidJson, ValidQuery};
use crate::db::{Change, Note};
use crate::error::ApiError;
use crate::images::{self, BlobWriter, Receiving};
use crate::model::{
    CreateImage, FileRole, Image, ImageFile, ImageSource, ImageState, ImageStatus, Meta,
};
use crate::validate;

/// The largest file an upload may declare (1 TiB).
pub const MAX_UPLOAD: u64 = 1 << 40;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/images", get(list).post(create))
        .route("/images/{image}", get(get_one).delete(remove))
        .route("/images/{image}/files/{role}", put(upload))
}

/// Images.
#[utoipa::path(get, path = "/v1/images", tag = "images", operation_id = "images.list",
    responses((status = 200, body = [Image])))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(st.db.list::<Image>()?))
}

/// One image (by name or id), with its import progress.
#[utoipa::path(get, path = "/v1/images/{image}", tag = "images", operation_id = "images.get",
    params(("image" = String, Path, description = "name or id")),
    responses((status = 200, body = Image)))]
pub async fn get_one(
    State(st): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(st.db.get::<Image>(&key)?))
}

/// Imports an image from files on this node. Answers at once with the
/// image `importing`; it becomes `ready` (or `failed`, with the reason).
#[utoipa::path(post, path = "/v1/images", tag = "images", operation_id = "images.create",
    request_body = CreateImage, responses((status = 202, body = Image)))]
pub async fn create(
    State(st): State<AppState>,
    ValidJson(req): ValidJson<CreateImage>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    validate::name("image", &req.name)?;
    for (role, path) in images::source_files(&req.spec.source) {
        validate::source_file(&format!("{role}").to_lowercase(), path)?;
    }
    if let ImageSource::Upload { files, .. } = &req.spec.source {
        check_upload_files(files)?;
    }
    if let Some(c) = req.spec.source.cmdline() {
        if c.len() > validate::MAX_CMDLINE || c.contains(['\0', '\n']) {
            return Err(ApiError::invalid(
                "cmdline must be one line of at most 2048 bytes",
            ));
        }
    }
    let image = Image {
        meta: Meta::new(&req.name),
        status: ImageStatus {
            state: ImageState::Importing,
            reason: None,
            bytes_total: images::source_size(&req.spec.source),
            bytes_done: 0,
            files: Vec::new(),
        },
        spec: req.spec,
    };
    st.db.create(&image, Note::new("created"))?;
    if !matches!(image.spec.source, ImageSource::Upload { .. }) {
        let (db, paths, id) = (st.db.clone(), st.paths.clone(), image.meta.id.clone());
        tokio::task::spawn_blocking(move || images::run_import(db, paths, id));
    }
    Ok((StatusCode::ACCEPTED, Json(image)))
}

/// An upload names a kernel (with an optional initrd) or a disk, each once,
/// with a size from 1 byte to [`MAX_UPLOAD`].
fn check_upload_files(files: &[crate::model::UploadFile]) -> Result<(), ApiError> {
    let mut roles: Vec<FileRole> = files.iter().map(|f| f.role).collect();
    roles.sort_by_key(|r| *r as u8);
    if !matches!(
        roles.as_slice(),
        [FileRole::Kernel] | [FileRole::Kernel, FileRole::Initrd] | [FileRole::Disk]
    ) {
        return Err(ApiError::invalid(
            "files must be a kernel, a kernel and an initrd, or a disk",
        ));
    }
    if let Some(f) = files.iter().find(|f| f.size == 0 || f.size > MAX_UPLOAD) {
        return Err(ApiError::invalid(format!(
            "the {} file's size must be 1 byte to 1 TiB, not {}",
            f.role, f.size
        )));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// The file's SHA-256 (hex); a file that does not match is refused.
    pub sha256: Option<String>,
}

/// Receives one file of an image created with an `upload` source: the body
/// is the file's bytes, exactly the size the image declared. The image
/// becomes `ready` when its last file has arrived; `bytes_done` reports
/// progress meanwhile. A broken or refused upload keeps nothing, and can
/// be sent again.
#[utoipa::path(put, path = "/v1/images/{image}/files/{role}", tag = "images", operation_id = "images.upload",
    params(("image" = String, Path, description = "name or id"),
           ("role" = FileRole, Path, description = "which file: kernel, initrd or disk"),
           UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Image)))]
pub async fn upload(
    State(st): State<AppState>,
    Path((key, role)): Path<(String, String)>,
    ValidQuery(q): ValidQuery<UploadQuery>,
    body: axum::body::Body,
) -> Result<Json<Image>, ApiError> {
    let role = match role.as_str() {
        "kernel" => FileRole::Kernel,
        "initrd" => FileRole::Initrd,
        "disk" => FileRole::Disk,
        _ => {
            return Err(ApiError::not_found(format!(
                "no file role {role}: use kernel, initrd or disk"
            )))
        }
    };
    if let Some(h) = &q.sha256 {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::bad_request("sha256 must be 64 hex digits"));
        }
    }
    let image: Image = st.db.get(&key)?;
    let name = image.meta.name.clone();
    let ImageSource::Upload { files, .. } = &image.spec.source else {
        return Err(ApiError::conflict(format!(
            "image {name} is imported from files on the node, not uploaded"
        )));
    };
    let Some(declared) = files.iter().find(|f| f.role == role).map(|f| f.size) else {
        return Err(ApiError::invalid(format!(
            "image {name} has no {role} file"
        )));
    };
    if image.status.state != ImageState::Importing || image.file(role).is_some() {
        return Err(ApiError::conflict(format!(
            "image {name} has its {role} file already"
        )));
    }
    let Some(_receiving) = Receiving::take(&image.meta.id, role) else {
        return Err(ApiError::conflict(format!(
            "the {role} file of image {name} is being uploaded already"
        )));
    };
    let id = image.meta.id.clone();
    let before: u64 = image.status.files.iter().map(|f| f.size).sum();
    let received = receive(&st, &id, before, declared, body).await;
    let w = match received {
        Ok(w) => w,
        Err(e) => {
            let reason = format!("the upload of the {role} file failed: {}", e.message);
            let _ = st.db.update(&id, Change::Observed, |i: &mut Image| {
                i.status.bytes_done = before;
                i.status.reason = Some(reason);
                Ok(None)
            });
            return Err(e);
        }
    };
    let sha256 = w.digest();
    if q.sha256
        .as_ref()
        .is_some_and(|h| !h.eq_ignore_ascii_case(&sha256))
    {
        return Err(ApiError::bad_request(format!(
            "the {role} file's SHA-256 is {sha256}, not the one given"
        )));
    }
    w.finish().await.map_err(ApiError::internal)?;
    let file = ImageFile {
        role,
        sha256,
        size: declared,
    };
    let r = st.db.update(&id, Change::Observed, |i: &mut Image| {
        if i.status.state != ImageState::Importing || i.file(role).is_some() {
            return Err(ApiError::conflict(format!(
                "image {} changed during the upload",
                i.meta.name
            )));
        }
        i.status.files.push(file.clone());
        i.status.bytes_done = i.status.files.iter().map(|f| f.size).sum();
        i.status.reason = None;
        if i.spec.source.roles().iter().all(|r| i.file(*r).is_some()) {
            i.status.state = ImageState::Ready;
            Ok(Some(Note::new("state")))
        } else {
            Ok(Some(Note::with(
                "uploaded",
                format!("{role} file received"),
            )))
        }
    });
    if r.is_err() {
        // Deleted (or changed) meanwhile: the blob may be nobody's.
        let (db, paths) = (st.db.clone(), st.paths.clone());
        let _ = tokio::task::spawn_blocking(move || images::collect_garbage(&db, &paths)).await;
    }
    Ok(Json(r?))
}

/// Streams the body into a new blob file, refusing more or fewer bytes than
/// declared; updates the image's progress twice a second.
async fn receive(
    st: &AppState,
    id: &str,
    before: u64,
    declared: u64,
    body: axum::body::Body,
) -> Result<BlobWriter, ApiError> {
    let mut w = BlobWriter::new(&st.paths)
        .await
        .map_err(ApiError::internal)?;
    let mut body = body;
    let mut last = Instant::now();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if w.written + data.len() as u64 > declared {
            return Err(ApiError::with_status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("more than the {declared} bytes the image declared for this file"),
            ));
        }
        w.write(&data).await.map_err(ApiError::internal)?;
        if last.elapsed() > Duration::from_millis(500) {
            last = Instant::now();
            let done = before + w.written;
            let _ = st.db.update(id, Change::Observed, |i: &mut Image| {
                i.status.bytes_done = done;
                Ok(None)
            });
        }
    }
    if w.written != declared {
        return Err(ApiError::bad_request(format!(
            "got {} bytes, but the image declared {declared} for this file",
            w.written
        )));
    }
    Ok(w)
}

/// Deletes an image no VM boots from; its blobs go when no image uses them.
#[utoipa::path(delete, path = "/v1/images/{image}", tag = "images", operation_id = "images.delete",
    params(("image" = String, Path, description = "name or id"),
           ("If-Match" = Option<String>, Header, description = "expected generation")),
    responses((status = 200, body = Image)))]
pub async fn remove(
    State(st): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Image>, ApiError> {
    let expected = if_match(&headers)?;
    let db = st.db.clone();
    let image = st.db.delete::<Image>(&key, expected, |i| {
        match images::used_by(&db, i).map_err(ApiError::from)? {
            Some(vm) => Err(ApiError::conflict(format!(
                "image {} is in use by VM {vm}",
                i.meta.name
            ))),
            None => Ok(()),
        }
    })?;
    let (db, paths) = (st.db.clone(), st.paths.clone());
    blocking(move || {
        images::collect_garbage(&db, &paths);
        Ok(())
    })
    .await?;
    Ok(Json(image))
}
