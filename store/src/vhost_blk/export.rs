//! An exported volume: a unix socket where one vhost-user frontend at a
//! time connects. When the frontend goes away (the VM exited or crashed),
//! the export forgets that connection's state (memory, rings) and waits for
//! the next one (a VM restart); it ends only when stopped.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlkBackend;
use super::config::ExportOptions;
use super::{VhostBlkError, VolumeSource};

/// A running export; [`Export::stop`] (or drop) ends it and removes the socket.
pub struct Export {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// The live connection, to cut it when stopping.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Export {
    /// Binds `socket` (replacing a stale file) and serves `name` on it from
    /// a background thread.
    pub fn start(
        name: &str,
        socket: &Path,
        source: VolumeSource,
        opts: ExportOptions,
    ) -> Result<Export, VhostBlkError> {
        opts.validate()
            .map_err(|e| VhostBlkError::Options(e.to_string()))?;
        check_socket_path(socket)?;
        let listener = Listener::new(socket, true).map_err(|e| VhostBlkError::Listen {
            path: socket.display().to_string(),
            source: e,
        })?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connection: Mutex::new(None),
        });
        let backend = BlkBackend::new(name, source, opts)?;
        let (n, s, p) = (name.to_string(), shared.clone(), socket.to_path_buf());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || serve(&n, &p, listener, backend, &s))?;
        tracing::info!(volume = name, socket = %socket.display(), "vhost-user-blk export listening");
        Ok(Export {
            socket: socket.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Disconnects the frontend, if any, stops listening and removes the
    /// socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.shared.connection.lock().expect(crate::POISONED).take() {
            c.shutdown();
        }
        // Wakes the thread if it is waiting in accept().
        let _ = UnixStream::connect(&self.socket);
        let _ = thread.join();
        if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The listener unlinks whatever is at the path before binding: refuse
/// anything but a socket (or nothing).
pub fn check_socket_path(socket: &Path) -> Result<(), VhostBlkError> {
    match std::fs::symlink_metadata(socket) {
        Ok(m) if !m.file_type().is_socket() => {
            Err(VhostBlkError::NotASocket(socket.display().to_string()))
        }
        _ => Ok(()),
    }
}

/// Accepts frontends one after another until stopped.
fn serve(name: &str, socket: &Path, mut listener: Listener, backend: BlkBackend, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        // A fresh daemon per connection: vrings, memory table and acked
        // features start from scratch, as a new VM expects.
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-{name}-conn"),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(volume = name, error = %e, "vhost-user-blk: cannot set up a connection handler");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            if !shared.stop.load(Ordering::SeqCst) {
                tracing::warn!(volume = name, error = %e, "vhost-user-blk: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            stop_workers(&daemon);
            continue;
        }
        *shared.connection.lock().expect(crate::POISONED) = daemon.shutdown_handle();
        if shared.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            tracing::info!(volume = name, socket = %socket.display(), "vhost-user frontend connected");
        }
        let result = daemon.wait();
        shared.connection.lock().expect(crate::POISONED).take();
        stop_workers(&daemon);
        // Requests of the old connection still being served land in its
        // used rings before anyone else connects.
        backend.drain();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {
                tracing::info!(volume = name, "vhost-user frontend disconnected")
            }
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "vhost-user frontend connection ended with an error")
            }
        }
    }
    tracing::info!(volume = name, socket = %socket.display(), "vhost-user-blk export stopped");
}

/// Ends the queue worker threads of a finished connection.
fn stop_workers(daemon: &VhostUserDaemon<BlkBackend>) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}
