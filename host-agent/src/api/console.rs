//! `/v1/vms/{vm}/console`: a VM's serial console, through kiln-vmm's
//! console socket. Reading (what kiln-vmm kept, optionally followed) is a
//! plain GET; attaching is a WebSocket whose binary messages carry the
//! guest's output one way and its input the other, so it needs `admin`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::vms::wrong_state;
use super::{AdminOnly, AppState, ValidQuery};
use crate::error::ApiError;
use crate::model::Vm;

/// The largest WebSocket message (and frame) an attached client may send.
pub const MAX_MESSAGE: usize = 64 << 10;

/// How long the closing handshake of an attached client may take.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/vms/{vm}/console", get(read))
        .route("/vms/{vm}/console/attach", get(attach))
}

/// The VM and a fresh connection to its console socket; 409 unless it has
/// a kiln-vmm (running or paused).
async fn open(st: &AppState, key: &str, what: &str) -> Result<(Vm, UnixStream), ApiError> {
    let vm = st.db.get::<Vm>(key)?;
    if vm.status.pid.is_none() {
        return Err(wrong_state(&vm, what));
    }
    let stream = connect(st, &vm).await?;
    Ok((vm, stream))
}

async fn connect(st: &AppState, vm: &Vm) -> Result<UnixStream, ApiError> {
    let sock = st.sup.console_socket(&vm.meta.id);
    UnixStream::connect(&sock).await.map_err(|e| {
        ApiError::conflict(format!(
            "the console of VM {} is not available: {e}",
            vm.meta.name
        ))
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output.
    #[serde(default)]
    pub follow: bool,
}

/// The VM's console output: what kiln-vmm kept (its last 64 KiB), and with
/// `follow=true` everything after it as it comes.
#[utoipa::path(get, path = "/v1/vms/{vm}/console", tag = "vms", operation_id = "vms.console",
    params(("vm" = String, Path, description = "name or id"), ConsoleQuery),
    responses((status = 200, content_type = "application/octet-stream", body = String)))]
pub async fn read(
    State(st): State<AppState>,
    Path(key): Path<String>,
    ValidQuery(q): ValidQuery<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let (_, mut stream) = open(&st, &key, "read the console of").await?;
    let headers = [(axum::http::header::CONTENT_TYPE, "application/octet-stream")];
    if q.follow {
        // The whole socket goes into the stream: dropping its write half
        // would shut it down, and kiln-vmm would take that as the client
        // leaving.
        let body = Body::from_stream(byte_stream(stream));
        return Ok((headers, body).into_response());
    }
    // What the ring buffer holds arrives at once; stop at the first quiet
    // moment.
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while out.len() < (1 << 20) {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    Ok((headers, out).into_response())
}

/// A reader as a stream of byte chunks, ending at end of file or error.
fn byte_stream(rd: UnixStream) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(rd, |mut rd| async move {
        let mut buf = vec![0u8; 16 * 1024];
        match rd.read(&mut buf).await {
            Ok(n) if n > 0 => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), rd))
            }
            _ => None,
        }
    })
}

/// Attaches to the VM's console: a WebSocket, for `admin` tokens only.
///
/// The server's binary messages are the guest's output, starting with what
/// kiln-vmm kept (its last 64 KiB); the client's binary or text messages
/// (at most 64 KiB each) are the guest's serial input, so a `reader` may
/// not attach. Other clients may be attached at the same time. The server
/// closes the WebSocket when the console closes (the VM stopped, or this
/// client did not keep up with the output); closing it from the client
/// detaches and leaves the VM running.
#[utoipa::path(get, path = "/v1/vms/{vm}/console/attach", tag = "vms",
    operation_id = "vms.console_attach",
    params(("vm" = String, Path, description = "name or id")),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket is open (send `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`)"),
        (status = 426, description = "The connection cannot be upgraded", body = crate::error::ErrorBody),
    ))]
pub async fn attach(
    _admin: AdminOnly,
    State(st): State<AppState>,
    Path(key): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // The VM's state first, then the upgrade: a probe without the upgrade
    // headers learns what a real client would.
    let vm = st.db.get::<Vm>(&key)?;
    if vm.status.pid.is_none() {
        return Err(wrong_state(&vm, "attach to the console of"));
    }
    let upgrade = upgrade.map_err(upgrade_rejection)?;
    let console = connect(&st, &vm).await?;
    let name = vm.meta.name;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_failed_upgrade(|e| tracing::debug!("console attach: the upgrade failed: {e}"))
        .on_upgrade(move |ws| relay(ws, console, name)))
}

/// axum's refusal of a request that is not a WebSocket upgrade, in the
/// API's error body.
fn upgrade_rejection(rej: WebSocketUpgradeRejection) -> ApiError {
    match rej.status() {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::method_not_allowed(),
        StatusCode::UPGRADE_REQUIRED => ApiError::with_status(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            rej.body_text(),
        ),
        _ => ApiError::bad_request(format!("this endpoint is a WebSocket: {}", rej.body_text())),
    }
}

/// Copies the console's output to the client and the client's messages to
/// the console until either side ends, then closes the other. Everything
/// runs in this one future: nothing outlives the connection.
async fn relay(ws: WebSocket, mut console: UnixStream, vm: String) {
    let (mut tx, mut rx) = ws.split();
    let (mut from_guest, mut to_guest) = console.split();
    let output = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_guest.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if tx.send(msg).await.is_err() {
                        return false;
                    }
                }
                _ => return true,
            }
        }
    };
    let input = async {
        while let Some(Ok(msg)) = rx.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if to_guest.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let console_ended = tokio::select! {
        ended = output => ended,
        () = input => false,
    };
    tracing::debug!(vm = %vm, console_ended, "console attach: closing");
    let frame = if console_ended {
        CloseFrame {
            code: close_code::AWAY,
            reason: Utf8Bytes::from_static("the VM stopped, or this client fell behind its output"),
        }
    } else {
        CloseFrame {
            code: close_code::NORMAL,
            reason: Utf8Bytes::from_static("detached"),
        }
    };
    // The closing handshake, bounded: answer (or send) the close, then
    // wait for the client's side of it.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = tx.send(Message::Close(Some(frame))).await;
        while let Some(Ok(_)) = rx.next().await {}
    })
    .await;
}
