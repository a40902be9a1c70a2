//! An exported volume: a unix socket where one vhost-user frontend at a
//! time connects. When the frontend goes away (the VM exited or crashed),
//! the export forgets that connection's state (memory, rings) and waits for
//! the next one (a VM restart); it ends only when stopped.
//!
//! The export accepts the frontend itself and relays its connection to the
//! vhost-user library on a private socket beside it (`SOCK.lib`), keeping
//! the backend-request channel so that a resize reaches the frontend as
//! `CONFIG_CHANGE_MSG` ([`super::relay`]).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
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
use super::relay::{self, BackendChannel};
use super::{VhostBlkError, VolumeSource};

/// A running export; [`Export::stop`] (or drop) ends it and removes the socket.
pub struct Export {
    socket: PathBuf,
    opts: ExportOptions,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// The live connection, to cut it when stopping.
    connection: Mutex<Option<ShutdownHandle>>,
    /// Its backend-request channel, if the frontend gave one.
    channel: Arc<BackendChannel>,
}

/// Where the library listens for the relayed connection.
fn library_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lib");
    PathBuf::from(p)
}

fn bind(path: &Path) -> Result<UnixListener, VhostBlkError> {
    check_socket_path(path)?;
    let listen = |e: std::io::Error| VhostBlkError::Listen {
        path: path.display().to_string(),
        source: vhost::vhost_user::Error::SocketError(e),
    };
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(listen)?;
    }
    let listener = UnixListener::bind(path).map_err(listen)?;
    // Only this user (the agent, root) may connect: a guest's disk.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen)?;
    Ok(listener)
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
        let public = bind(socket)?;
        let lib_path = library_path(socket);
        let library = Listener::from(bind(&lib_path)?);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connection: Mutex::new(None),
            channel: Arc::new(BackendChannel::default()),
        });
        let backend = BlkBackend::new(name, source, opts)?;
        let (n, s, p) = (name.to_string(), shared.clone(), socket.to_path_buf());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || {
                let sockets = Sockets {
                    public,
                    library,
                    lib_path,
                };
                serve(&n, &p, sockets, backend, &s)
            })?;
        tracing::info!(volume = name, socket = %socket.display(), "vhost-user-blk export listening");
        Ok(Export {
            socket: socket.to_path_buf(),
            opts,
            shared,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How it serves the volume.
    pub fn options(&self) -> ExportOptions {
        self.opts
    }

    /// Tells the connected frontend that the config space changed (a
    /// resize: the capacity). `Ok(false)` when no frontend is connected or
    /// it gave no backend-request channel.
    pub fn config_changed(&self) -> std::io::Result<bool> {
        self.shared.channel.config_changed()
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
        for p in [self.socket.clone(), library_path(&self.socket)] {
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(&p);
            }
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

struct Sockets {
    /// Where frontends connect.
    public: UnixListener,
    /// Where the library accepts the relayed connection.
    library: Listener,
    lib_path: PathBuf,
}

/// Accepts frontends one after another until stopped.
fn serve(name: &str, socket: &Path, mut sockets: Sockets, backend: BlkBackend, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let frontend = match sockets.public.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "vhost-user-blk: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
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
        let library = match UnixStream::connect(&sockets.lib_path) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(volume = name, error = %e, "vhost-user-blk: cannot reach the library's socket");
                stop_workers(&daemon);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut sockets.library) {
            if !shared.stop.load(Ordering::SeqCst) {
                tracing::warn!(volume = name, error = %e, "vhost-user-blk: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            stop_workers(&daemon);
            continue;
        }
        let relays = match relay::start(frontend, library, shared.channel.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(volume = name, error = %e, "vhost-user-blk: cannot relay the connection");
                daemon.request_shutdown();
                None
            }
        };
        *shared.connection.lock().expect(crate::POISONED) = daemon.shutdown_handle();
        if shared.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            tracing::info!(volume = name, socket = %socket.display(), "vhost-user frontend connected");
        }
        let result = daemon.wait();
        shared.connection.lock().expect(crate::POISONED).take();
        stop_workers(&daemon);
        // The library's end is closed: the relay ends (and closes the
        // frontend's connection).
        if let Some((up, down)) = relays {
            let _ = up.join();
            let _ = down.join();
        }
        // Requests of the old connection still being served land in its
        // used rings before anyone else connects.
        backend.drain();
        let stats = backend.take_stats();
        tracing::info!(volume = name, "vhost-user-blk session: {stats}");
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
