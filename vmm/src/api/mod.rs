//! kiln-vmm's control API, in three layers:
//!
//! - this module, the internal API: a typed [`VmAction`], what it returns
//!   ([`ApiReply`], [`ApiError`]) and the channel that hands actions to the
//!   VMM's event loop. It knows nothing of HTTP.
//! - [`parse`]: the pure step from (method, path, body) to an action or an
//!   error, tested without KVM.
//! - [`http`]: the synchronous HTTP/1.1 server on a Unix socket, on its own
//!   thread under its own seccomp filter.
//!
//! A request's way: the API thread parses it, sends an [`ApiRequest`] (the
//! action and a one-shot reply sender) on an mpsc channel, writes the
//! channel's eventfd and blocks on the reply. The main thread's epoll loop
//! (`runtime`) wakes on the eventfd, runs every queued action (`control`)
//! and replies. An action that ends the VM (power-off, reboot) waits, at
//! most a second, for the API thread to have written its response.

pub mod http;
pub mod parse;

use std::sync::mpsc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `PUT /vm/snapshot`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// Where `state` and `memory` go: an existing, empty directory or one
    /// to create.
    pub destination_dir: std::path::PathBuf,
}

/// `PUT /vm/migrate`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// `unix:/path` or `tcp:HOST:PORT` of a `kiln-vmm --incoming`.
    pub destination: String,
    /// The pause the guest may see, in milliseconds (default 300).
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// The whole migration's limit, in seconds (default 600).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// For `tcp:`: a file holding the 32-byte secret both ends share.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
}

fn default_downtime_ms() -> u64 {
    300
}
fn default_timeout_s() -> u64 {
    600
}

/// What a client can ask of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmAction {
    /// `GET /vm`: state, configuration, counters.
    Info,
    /// `PUT /vm/shutdown`: press the guest's ACPI power button.
    Shutdown,
    /// `PUT /vm/power-off`: end the VM now, as a guest power-off does.
    PowerOff,
    /// `PUT /vm/pause`: stop the vCPUs.
    Pause,
    /// `PUT /vm/resume`: let them run again.
    Resume,
    /// `PUT /vm/reboot`: reset the VM, as a guest reboot does (what happens
    /// next is `--on-reboot`'s choice).
    Reboot,
    /// `PUT /vm/snapshot`: write the paused VM to a directory.
    Snapshot(SnapshotParams),
    /// `PUT /vm/migrate`: move the running VM to another kiln-vmm.
    Migrate(MigrateParams),
}

impl VmAction {
    /// Whether the VM ends once the action is done.
    pub fn ends_vm(&self) -> bool {
        matches!(self, Self::PowerOff | Self::Reboot)
    }
}

/// A successful action's result.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// `GET /vm`'s document.
    Info(serde_json::Value),
    /// Done, nothing to say (204).
    Done,
    /// Started; `GET /vm` follows it (202, with this document).
    Accepted(serde_json::Value),
}

/// Why an action failed; `status` is the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(404, m)
    }
    pub fn method_not_allowed(m: impl Into<String>) -> Self {
        Self::new(405, m)
    }
    /// The VM is not in a state where the action makes sense.
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(409, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(413, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(500, m)
    }
}

pub type ApiResult = Result<ApiReply, ApiError>;

/// The VMM's answer, and for an action that ends the VM, where to say that
/// the response has been written (the VMM waits for it before exiting).
pub struct ApiResponse {
    pub result: ApiResult,
    pub written: Option<mpsc::SyncSender<()>>,
}

/// One action on its way to the event loop.
pub struct ApiRequest {
    pub action: VmAction,
    pub reply: mpsc::Sender<ApiResponse>,
}

/// The API thread's end of the channel.
pub struct ApiSender {
    tx: mpsc::Sender<ApiRequest>,
    evt: EventFd,
}

/// The event loop's end: the eventfd to poll and the queued requests.
pub struct ApiReceiver {
    pub rx: mpsc::Receiver<ApiRequest>,
    pub evt: EventFd,
}

/// A connected pair.
pub fn channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let evt = EventFd::new(EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        ApiSender {
            tx,
            evt: evt.try_clone()?,
        },
        ApiReceiver { rx, evt },
    ))
}

/// How long an action that ends the VM waits for its response to be
/// written before the VMM exits anyway.
pub const WRITE_GRACE: Duration = Duration::from_secs(1);

impl ApiSender {
    /// Runs `action` on the event loop and waits for its response.
    pub fn call(&self, action: VmAction) -> ApiResponse {
        let gone = || ApiResponse {
            result: Err(ApiError::internal("the VMM is shutting down")),
            written: None,
        };
        let (reply, answer) = mpsc::channel();
        if self.tx.send(ApiRequest { action, reply }).is_err() {
            return gone();
        }
        if let Err(e) = self.evt.write(1) {
            return ApiResponse {
                result: Err(ApiError::internal(format!("cannot wake the VMM: {e}"))),
                written: None,
            };
        }
        answer.recv().unwrap_or_else(|_| gone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_reaches_the_receiver_and_gets_its_reply() {
        let (tx, rx) = channel().unwrap();
        let server = std::thread::spawn(move || {
            let req = rx.rx.recv().unwrap();
            // The caller writes the (non-blocking) eventfd right after
            // queueing the request.
            let woken = loop {
                match rx.evt.read() {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                    r => break r.unwrap(),
                }
            };
            assert_eq!(woken, 1);
            assert_eq!(req.action, VmAction::Pause);
            req.reply
                .send(ApiResponse {
                    result: Err(ApiError::conflict("already paused")),
                    written: None,
                })
                .unwrap();
        });
        let r = tx.call(VmAction::Pause);
        assert_eq!(r.result, Err(ApiError::conflict("already paused")));
        server.join().unwrap();
        // With the receiver gone, a call fails instead of hanging.
        assert_eq!(tx.call(VmAction::Info).result.unwrap_err().status, 500);
    }
}
