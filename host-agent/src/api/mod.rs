//! The HTTP/JSON API under `/v1`: one router per resource, one state, one
//! error type, input through extractors that answer with that error type.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use serde::de::DeserializeOwned;

use crate::db::Db;
use crate::error::ApiError;
use crate::model::{NodeInfo, Role};
use crate::paths::Paths;
use crate::supervisor::Supervisor;

pub mod console;
pub mod events;
pub mod images;
pub mod linger;
pub mod metrics;
pub mod networks;
pub mod node;
pub mod openapi;
pub mod tokens;
pub mod trust;
pub mod vms;
pub mod volumes;

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Db>,
    pub paths: Paths,
    pub node: Arc<NodeInfo>,
    pub sup: Arc<Supervisor>,
    pub store: Arc<crate::store::Store>,
    pub trust: Arc<crate::trust::Trust>,
}

/// The whole API. `authenticated`: every request needs a bearer token
/// (the TCP listener); the root-only unix socket is trusted.
pub fn router(state: AppState, authenticated: bool) -> Router {
    let v1 = Router::new()
        .merge(node::router())
        .merge(tokens::router())
        .merge(trust::router())
        .merge(images::router())
        .merge(networks::router())
        .merge(volumes::router())
        .merge(vms::router())
        .merge(console::router())
        .merge(events::router())
        .merge(openapi::router());
    let mut r = Router::new()
        .nest("/v1", v1)
        .merge(metrics::router())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(MAX_BODY));
    if authenticated {
        r = r.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    } else {
        r = r.layer(axum::middleware::map_request(trusted_caller));
    }
    r.layer(axum::middleware::map_response(close_after_error))
        .layer(axum::middleware::from_fn(linger::drain_unread_body))
        .with_state(state)
}

/// An error may be answered before the request's body was read (a refused
/// token, a wrong method, a body too large), after which the server closes
/// the connection; saying so keeps a client from sending its next request
/// into it.
async fn close_after_error(mut resp: Response) -> Response {
    if resp.status().is_client_error() || resp.status().is_server_error() {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

async fn require_token(
    axum::extract::State(st): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = crate::auth::authenticate(&st.db, header)?;
    crate::auth::authorize(token.spec.role, req.method())?;
    req.extensions_mut().insert(Caller(token.spec.role));
    Ok(next.run(req).await)
}

/// The root-only unix socket's callers may do everything.
async fn trusted_caller(mut req: Request) -> Request {
    req.extensions_mut().insert(Caller(Role::Admin));
    req
}

/// The role a request was made with.
#[derive(Clone, Copy, Debug)]
pub struct Caller(pub Role);

/// Admits only the `admin` role (403 otherwise): for a GET that still
/// writes, such as attaching to a console, whose input reaches the guest.
/// A request that came with no role at all is refused too.
pub struct AdminOnly;

impl<S: Send + Sync> FromRequestParts<S> for AdminOnly {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<Caller>() {
            Some(Caller(Role::Admin)) => Ok(AdminOnly),
            _ => Err(ApiError::forbidden()),
        }
    }
}

/// A JSON body, refused with the API's error body: 400 for bad JSON, 422
/// for well-formed JSON of the wrong shape (the field is named), 413, 415.
pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ValidJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::payload_too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::with_status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid(rej.body_text()),
        _ => ApiError::bad_request(rej.body_text()),
    }
}

/// A query string, refused with a 400 in the API's error body.
pub struct ValidQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ValidQuery(v)),
            Err(rej) => Err(query_rejection(rej)),
        }
    }
}

fn query_rejection(rej: QueryRejection) -> ApiError {
    ApiError::bad_request(rej.body_text())
}

/// The generation a change is based on: `If-Match: <n>` (quotes allowed).
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(axum::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .unwrap_or("");
    s.parse::<u64>().map(Some).map_err(|_| {
        ApiError::bad_request("If-Match must be a resource generation, e.g. If-Match: \"3\"")
    })
}

/// Runs blocking work (file I/O, the store's client) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}
