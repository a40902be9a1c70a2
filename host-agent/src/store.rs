//! The node's kiln-store daemon, through kiln-store's client library: the
//! agent uses a daemon it finds on the store socket, or starts one with a
//! single-node layout (data under `<data-dir>/store`), in its own process
//! group so that it outlives the agent like the VMs do.
//!
//! The daemon the agent starts replicates over mutual TLS with the node's
//! identity (`/etc/kiln/pki`: node.crt, node.key, ca.crt): the same key
//! and certificate as the agent's API, so a peer store is accepted only
//! with a certificate of this node's (later: this cluster's) CA.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_store::meta::ReplicaAddr;
use kiln_store::proto::{Request, Response, VolumeStatus};
use kiln_store::Client;

use crate::db::{Db, Note};
use crate::error::ApiError;
use crate::model::NodeInfo;

#[derive(Clone, Debug)]
pub struct Store {
    pub socket: PathBuf,
    pub program: PathBuf,
    pub data: PathBuf,
    /// The replication listener of a daemon the agent starts.
    pub listen: String,
    /// The node's TLS identity, for the replication port.
    pub tls: kiln_store::transport::TlsFiles,
    /// This node's id in replica sets (the node's name).
    pub node: String,
    pub log: PathBuf,
    /// Times the agent found the daemon gone and started it again.
    pub restarts: Arc<AtomicU64>,
}

/// The store's error as the API's: bad values 422, missing 404, taken 409,
/// unreachable 503, anything else 409 with the store's words.
fn api_error(e: kiln_store::Error) -> ApiError {
    use kiln_store::Error as E;
    match e {
        E::Invalid(m) => ApiError::invalid(format!("kiln-store: {m}")),
        E::NotFound(n) => ApiError::not_found(format!("kiln-store has no volume {n:?}")),
        E::Exists(n) => ApiError::conflict(format!("kiln-store: {n:?} already exists")),
        E::Unavailable(m) => ApiError::unavailable(format!("kiln-store: {m}")),
        other => ApiError::conflict(format!("kiln-store: {other}")),
    }
}

impl Store {
    /// One long request whose progress frames go to `progress` (blocking).
    pub fn call_with_progress(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(kiln_store::proto::Progress),
    ) -> Result<Response, ApiError> {
        let mut c = Client::connect(&self.socket).map_err(api_error)?;
        c.call_with_progress(req, progress).map_err(api_error)
    }

    /// One request to the daemon (blocking).
    pub fn call(&self, req: &Request) -> Result<Response, ApiError> {
        let mut c = Client::connect(&self.socket).map_err(api_error)?;
        c.call(req).map_err(api_error)
    }

    pub fn status(&self, name: &str) -> Result<VolumeStatus, ApiError> {
        match self.call(&Request::VolShow {
            name: name.to_string(),
        })? {
            Response::Status(s) => Ok(s),
            other => Err(ApiError::internal(format!(
                "kiln-store answered VolShow with {other:?}"
            ))),
        }
    }

    /// Every volume the daemon holds, with its replicas' health.
    pub fn list(&self) -> Result<Vec<VolumeStatus>, ApiError> {
        match self.call(&Request::VolList)? {
            Response::Volumes(v) => Ok(v),
            other => Err(ApiError::internal(format!(
                "kiln-store answered VolList with {other:?}"
            ))),
        }
    }

    pub fn replica(&self) -> ReplicaAddr {
        ReplicaAddr {
            node: self.node.clone(),
            addr: self.listen.clone(),
        }
    }

    fn answers(&self) -> bool {
        Client::connect(&self.socket)
            .and_then(|mut c| c.call(&Request::VolList))
            .is_ok()
    }

    /// Uses the daemon on the socket, or starts one (blocking).
    pub fn ensure_running(&self) -> Result<()> {
        if self.answers() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("cannot create {}", self.data.display()))?;
        if let Some(d) = self.socket.parent() {
            std::fs::create_dir_all(d)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(&self.program)
            .args(["serve", "--node-id", &self.node, "--listen", &self.listen])
            .args(self.tls.serve_args())
            .arg("--data")
            .arg(&self.data)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        let start = Instant::now();
        while !self.answers() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "kiln-store exited ({status}) at start; see {}",
                    self.log.display()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                bail!(
                    "kiln-store did not answer within 20 s; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(
            "started kiln-store (pid {}) on {}",
            child.id(),
            self.socket.display()
        );
        // Reap it if it ends while this agent runs; it is not tied to us.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }

    /// Keeps the daemon running while the agent runs: every `every`, a
    /// daemon that does not answer is started again (a second daemon
    /// cannot take over a live one's data or port, so a hung one is left
    /// to its operator). Going away and coming back are node events.
    pub async fn supervise(self: Arc<Self>, db: Arc<Db>, node: Arc<NodeInfo>, every: Duration) {
        // Events only for a daemon that was there: a node without kiln-store
        // (no volumes) is not told every few seconds.
        let mut seen = false;
        let mut down = false;
        let mut wait = Duration::ZERO;
        loop {
            tokio::time::sleep(wait).await;
            wait = wait.max(every);
            let store = self.clone();
            let answers = tokio::task::spawn_blocking(move || store.answers())
                .await
                .unwrap_or(false);
            if answers {
                seen = true;
                down = false;
                wait = every;
                continue;
            }
            if seen && !down {
                down = true;
                tracing::warn!("kiln-store does not answer on {}", self.socket.display());
                let _ = db.node_event(
                    &node,
                    "store-down",
                    Note::with("store", "kiln-store does not answer; starting it again"),
                );
            }
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.ensure_running()).await {
                Ok(Ok(())) if !seen => seen = true,
                Ok(Ok(())) => {
                    down = false;
                    wait = every;
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    let _ = db.node_event(
                        &node,
                        "store-up",
                        Note::with("store", "kiln-store started again"),
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!("cannot start kiln-store: {e:#}");
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(e) => tracing::warn!("cannot start kiln-store: {e}"),
            }
        }
    }
}
