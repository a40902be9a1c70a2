//! Live migration: a running VM's RAM and state sent to another kiln-vmm,
//! pre-copy, over a unix socket or TCP.
//!
//! - [`transport`]: addresses, who may connect, checksummed frames;
//! - [`protocol`]: the messages and their layout;
//! - [`send`]: the source's pre-copy driver, over [`send::MigrationSource`];
//! - [`receive`]: the destination, over [`receive::MigrationTarget`].
//!
//! The VMM implements the two traits (guest memory, the KVM dirty log,
//! pause/save, restore/run); this module knows nothing of KVM. No thread is
//! started here: both sides block the calling thread, with a timeout on
//! every read and write.

use std::fmt;
use std::io;

pub mod auth;
pub mod protocol;
pub mod receive;
pub mod send;
pub mod transport;

#[cfg(test)]
mod tests;

use protocol::Message;
pub use protocol::{DeviceId, Handed, Machine};
pub use receive::{receive, receive_on, MigrationTarget, ReceiveConfig, ReceiveReport};
pub use send::{
    migrate, migrate_over, Handover, MigrationReport, MigrationSource, Phase, Progress,
    ProgressSnapshot, RoundStats, SendConfig, SwitchReason,
};
pub use transport::{Address, Listener, Secret, TransportConfig};

/// Where a migration was when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Source: connecting and authenticating.
    Connect,
    /// Either side: the Hello / Accept exchange.
    Hello,
    /// Source: pre-copy round `n` (0: all RAM); destination: receiving RAM.
    Memory { round: u32 },
    /// Source: pausing the VM and saving its state.
    Pause,
    /// Source: the pages dirtied last, the VM paused.
    FinalMemory,
    /// Either side: the machine state.
    State,
    /// Source: waiting for the destination to restore the machine.
    AwaitRestored,
    /// Source: committed, waiting for the destination to say the VM runs
    /// there.
    AwaitResumed,
    /// Destination: waiting for the source to connect.
    Accept,
    /// Destination: restoring the machine (not running it yet).
    Restore,
    /// Destination: restored, waiting for the source to commit.
    AwaitCommit,
    /// Destination: starting the restored VM.
    Run,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Connect => f.write_str("while connecting"),
            Stage::Hello => f.write_str("while exchanging Hello"),
            Stage::Memory { round: 0 } => f.write_str("while copying RAM (round 0, all pages)"),
            Stage::Memory { round } => write!(f, "while copying RAM (round {round}, dirty pages)"),
            Stage::Pause => f.write_str("while pausing the VM and saving its state"),
            Stage::FinalMemory => f.write_str("while copying the last dirty pages (VM paused)"),
            Stage::State => f.write_str("while transferring the machine state"),
            Stage::AwaitRestored => {
                f.write_str("while waiting for the destination to restore the VM")
            }
            Stage::AwaitResumed => {
                f.write_str("after committing, while waiting for the destination to run the VM")
            }
            Stage::Accept => f.write_str("while waiting for a source to connect"),
            Stage::Restore => f.write_str("while restoring the VM"),
            Stage::AwaitCommit => f.write_str("while waiting for the source to commit"),
            Stage::Run => f.write_str("while starting the restored VM"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("the peer aborted: {0}")]
    Aborted(String),
    #[error("unexpected {got} message (expected {expected})")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("the VM: {0}")]
    Vm(io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<transport::TransportError> for ErrorKind {
    fn from(e: transport::TransportError) -> Self {
        ErrorKind::Protocol(e.into())
    }
}

/// A failed migration: where, and why. On the source, the VM runs on,
/// unless `in_doubt`.
#[derive(Debug, thiserror::Error)]
#[error("migration failed {stage}: {kind}{}", if *.in_doubt { IN_DOUBT } else { "" })]
pub struct MigrationError {
    pub stage: Stage,
    pub kind: ErrorKind,
    /// Source only: the source had committed (sent Commit) and then lost
    /// the destination before hearing Resumed or Abort. The VM stays
    /// paused here and may be running on the destination: resuming it here
    /// without checking there could run it twice.
    pub in_doubt: bool,
}

const IN_DOUBT: &str =
    "; the source stays paused: the VM may be running on the destination (check it before resuming here)";

impl MigrationError {
    pub fn new(stage: Stage, kind: impl Into<ErrorKind>) -> Self {
        MigrationError {
            stage,
            kind: kind.into(),
            in_doubt: false,
        }
    }
}

/// Receives the next message on `conn`, failing at `stage`.
fn recv_at(conn: &mut transport::Connection, stage: Stage) -> Result<Message, MigrationError> {
    protocol::recv(conn).map_err(|e| MigrationError::new(stage, e))
}

/// The error for a message other than `expected` at `stage`: the peer's
/// Abort with its reason, or an unexpected message.
fn unwanted(stage: Stage, got: Message, expected: &'static str) -> MigrationError {
    match got {
        Message::Abort { reason } => MigrationError::new(stage, ErrorKind::Aborted(reason)),
        m => MigrationError::new(
            stage,
            ErrorKind::Unexpected {
                got: m.name(),
                expected,
            },
        ),
    }
}

/// Ends the connection of a failed migration, either side: unless the
/// peer ended it (Refuse or Abort), tells it why with an Abort (best
/// effort, within a second); then shuts the connection down. Returns `e`.
fn fail_connection(conn: &mut transport::Connection, e: MigrationError) -> MigrationError {
    if !matches!(e.kind, ErrorKind::Refused(_) | ErrorKind::Aborted(_)) {
        let _ = conn.set_io_timeout(std::time::Duration::from_secs(1));
        let _ = protocol::send(
            conn,
            &Message::Abort {
                reason: e.to_string(),
            },
        );
    }
    conn.shutdown();
    e
}
