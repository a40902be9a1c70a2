//! `/v1/images`: kernels (with initramfs) and disk images, imported from a
//! path on the node, content-addressed by SHA-256 and deduplicated.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};

use super::{blocking, if_match, AppState, ValidJson};
use crate::db::Note;
use crate::error::ApiError;
use crate::images;
use crate::model::{CreateImage, Image, ImageSource, ImageState, ImageStatus, Meta};
use crate::validate;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/images", get(list).post(create))
        .route("/images/{image}", get(get_one).delete(remove))
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
        validate::source_file(&format!("{role:?}").to_lowercase(), path)?;
    }
    if let ImageSource::Kernel {
        cmdline: Some(c), ..
    } = &req.spec.source
    {
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
    let (db, paths, id) = (st.db.clone(), st.paths.clone(), image.meta.id.clone());
    tokio::task::spawn_blocking(move || images::run_import(db, paths, id));
    Ok((StatusCode::ACCEPTED, Json(image)))
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
