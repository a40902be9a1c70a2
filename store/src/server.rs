//! The daemon: serves replica operations to other nodes over TCP, and the
//! local CLI and block I/O over a unix socket; runs writers for attached
//! volumes and a rate-limited background scrub.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::VolumeIo;
use crate::meta::ReplicaAddr;
use crate::proto::{self, Kind, Progress, Request, Response, VolumeStatus};
use crate::transport::{Connector, Link, PlainServer, ServerTransport, TcpConnector, TlsFiles};
use crate::writer::{Keys, Writer};
use crate::{replica, resync, validate_name};

mod dispatch;
mod scrub;

/// How the replication port is protected.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS: peers need a certificate of this cluster's CA.
    Tls(TlsFiles),
    /// Plain TCP, for experiments: the port must be on loopback.
    InsecureLoopback,
}

/// At most this many connections from peers at once; more are refused. A
/// writer opens up to [`crate::writer::links::MAX_LINKS`] per volume to each
/// replica, to have that many requests in flight.
pub const MAX_PEER_CONNECTIONS: usize = 512;

pub struct Config {
    pub node_id: String,
    pub data: Vec<PathBuf>,
    pub listen: String,
    pub security: Security,
    pub socket: PathBuf,
    /// Background scrub rate in bytes per second (0 = off).
    pub scrub_rate: u64,
    /// Pause between background scrub passes.
    pub scrub_interval: Duration,
    /// A peer connection that sends nothing for this long is closed.
    pub peer_idle_timeout: Duration,
    /// How long a lone small write polls for its replicas' answers before
    /// sleeping (zero: never); process-wide ([`crate::transport::poll`]).
    pub reply_poll: Duration,
}

pub struct Daemon {
    pub engine: Arc<Engine>,
    connector: Arc<dyn Connector>,
    writers: Mutex<HashMap<String, Arc<Writer>>>,
    /// vhost-user-blk exports of attached volumes, by volume name.
    vhost_exports: Mutex<HashMap<String, crate::vhost_blk::Export>>,
    me: Weak<Daemon>,
}

type ProgressFn<'a> = &'a mut dyn FnMut(Progress);

impl Daemon {
    pub fn new(engine: Arc<Engine>, connector: Arc<dyn Connector>) -> Arc<Daemon> {
        Arc::new_cyclic(|me| Daemon {
            engine,
            connector,
            writers: Mutex::new(HashMap::new()),
            vhost_exports: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    fn writer(&self, name: &str) -> Result<Arc<Writer>> {
        validate_name(name)?;
        self.writers
            .lock()
            .expect(crate::POISONED)
            .get(name)
            .cloned()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "volume {name:?} is not attached on this node (run `kiln-store volume attach {name}`)"
                ))
            })
    }

    /// Block I/O on a volume attached to this daemon, for in-process
    /// callers such as a vhost-user-blk backend. Attach first (`volume
    /// attach` or [`Daemon::attach`]).
    pub fn volume_io(&self, name: &str) -> Result<Arc<dyn VolumeIo>> {
        let w = self.writer(name)?;
        Ok(w)
    }

    /// Serves `name` (attached here) as a vhost-user-blk backend on the unix
    /// socket `socket`, for a VMM such as `kiln-vmm --disk vhost-user=SOCK`.
    /// One frontend at a time; when it disconnects the export waits for the
    /// next. Replaces an earlier export of the same volume, unless that one
    /// is on the same socket with the same options: then it is kept.
    pub fn export_vhost(&self, name: &str, socket: &Path) -> Result<()> {
        self.export_vhost_with(name, socket, crate::vhost_blk::ExportOptions::default())
    }

    /// [`Daemon::export_vhost`] with a queue count and, optionally,
    /// read-only.
    /// Whether `name` can be exported on `socket` with `opts`, before
    /// anything is touched: options in range, a directory to bind in, and
    /// no other live server (another export, a daemon) or other file on
    /// the socket's path. [`ExportCheck::Unchanged`] if it is exported
    /// there so already.
    fn check_export(
        &self,
        name: &str,
        socket: &Path,
        opts: crate::vhost_blk::ExportOptions,
    ) -> Result<ExportCheck> {
        opts.validate()?;
        crate::vhost_blk::export::check_socket_path(socket)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let dir = socket.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(Error::Invalid(format!(
                "cannot export on {}: no directory {}",
                socket.display(),
                dir.display()
            )));
        }
        let (same, unchanged) = self
            .vhost_exports
            .lock()
            .expect(crate::POISONED)
            .get(name)
            .map_or((false, false), |e| {
                (
                    e.socket() == socket,
                    e.socket() == socket && e.options() == opts,
                )
            });
        if unchanged {
            return Ok(ExportCheck::Unchanged);
        }
        if !same && socket_in_use(socket) {
            return Err(Error::Invalid(format!(
                "{} is in use by another server",
                socket.display()
            )));
        }
        Ok(ExportCheck::New)
    }

    /// Attaches `name` and serves it on `socket` as one step: the export is
    /// checked first, and an attach made here is undone when the export
    /// still fails (an attach that was already there stays).
    fn attach_and_export(
        &self,
        name: &str,
        force: bool,
        keys: Keys,
        socket: &Path,
        opts: crate::vhost_blk::ExportOptions,
    ) -> Result<Arc<Writer>> {
        validate_name(name)?;
        self.check_export(name, socket, opts)?;
        let before = self.writer(name).ok();
        let w = self.attach_with_keys(name, None, force, keys)?;
        if let Err(e) = self.export_vhost_with(name, socket, opts) {
            if !before.is_some_and(|b| Arc::ptr_eq(&b, &w)) {
                tracing::warn!(volume = name, error = %e, "export failed: detaching the volume again");
                self.detach(name);
            }
            return Err(e);
        }
        Ok(w)
    }

    /// Stops serving and writing `name` here (nothing if it is not
    /// attached).
    fn detach(&self, name: &str) {
        self.unexport_vhost(name);
        if let Some(w) = self.writers.lock().expect(crate::POISONED).remove(name) {
            w.detach();
        }
    }

    pub fn export_vhost_with(
        &self,
        name: &str,
        socket: &Path,
        opts: crate::vhost_blk::ExportOptions,
    ) -> Result<()> {
        self.writer(name)?;
        // Exporting again as it is already exported keeps the export and
        // its frontend: a kiln-vmm taking the VM over on this node (a live
        // migration) asks while the one it replaces is still connected.
        // Another socket or other options replace it.
        if self.check_export(name, socket, opts)? == ExportCheck::Unchanged {
            return Ok(());
        }
        self.unexport_vhost(name);
        let (me, vol) = (self.me.clone(), name.to_string());
        let source: crate::vhost_blk::VolumeSource = Arc::new(move || {
            me.upgrade()
                .ok_or_else(|| Error::Unavailable("daemon stopped".into()))?
                .volume_io(&vol)
        });
        let export = crate::vhost_blk::Export::start(name, socket, source, opts)
            .map_err(|e| Error::Io(e.to_string()))?;
        self.vhost_exports
            .lock()
            .expect(crate::POISONED)
            .insert(name.to_string(), export);
        Ok(())
    }

    /// Stops the vhost-user-blk export of `name`, if any (disconnecting its
    /// frontend and removing the socket).
    pub fn unexport_vhost(&self, name: &str) {
        let export = self
            .vhost_exports
            .lock()
            .expect(crate::POISONED)
            .remove(name);
        if let Some(e) = export {
            tracing::info!(volume = name, socket = %e.socket().display(), "stopping vhost-user-blk export");
            e.stop();
        }
    }

    /// Makes this daemon the writer of `name` (raising its epoch), using the
    /// replica set stored with the local replica unless one is given. Needs
    /// a majority of the replicas reachable unless `force`.
    pub fn attach(
        &self,
        name: &str,
        replicas: Option<Vec<ReplicaAddr>>,
        force: bool,
    ) -> Result<Arc<Writer>> {
        self.attach_with_keys(name, replicas, force, Keys::default())
    }

    /// [`Daemon::attach`] for an encrypted volume: `keys` must be its key
    /// (and an interrupted rekey's new key, which resumes the rekey). Wrong
    /// or missing keys, or a key for a plaintext volume, are refused and
    /// nothing is attached.
    pub fn attach_with_keys(
        &self,
        name: &str,
        replicas: Option<Vec<ReplicaAddr>>,
        force: bool,
        keys: Keys,
    ) -> Result<Arc<Writer>> {
        if let Ok(w) = self.writer(name) {
            if !w.is_fenced() && !w.is_detached() {
                w.accepts(&keys)?;
                return Ok(w);
            }
        }
        let replicas = match replicas {
            Some(r) => r,
            None => self.engine.info(name)?.replicas,
        };
        let w = Writer::attach(
            name,
            replicas,
            self.engine.clone(),
            self.connector.clone(),
            force,
            keys,
        )?;
        let r = w.clone();
        std::thread::Builder::new()
            .name(format!("resync-{name}"))
            .spawn(move || resync::run(r))?;
        w.spawn_rekey()?;
        if let Some(old) = self
            .writers
            .lock()
            .expect(crate::POISONED)
            .insert(name.to_string(), w.clone())
        {
            old.detach();
        }
        Ok(w)
    }

    fn remote(&self, r: &ReplicaAddr, req: &Request) -> Result<Response> {
        if r.node == self.engine.node_id() {
            replica::handle(&self.engine, self.connector.as_ref(), req).into_result()
        } else {
            Link::peer(self.connector.connect(&r.node, &r.addr)?).call(req)
        }
    }

    fn status(&self, name: &str) -> Result<VolumeStatus> {
        if let Ok(w) = self.writer(name) {
            let mut st = w.status();
            st.node = self.engine.node_metrics();
            return Ok(st);
        }
        let i = self.engine.info(name)?;
        Ok(VolumeStatus {
            name: i.name,
            size: i.size,
            epoch: i.epoch,
            attached: false,
            fenced: false,
            replicas: i
                .replicas
                .iter()
                .map(|r| proto::ReplicaStatus {
                    node: r.node.clone(),
                    addr: r.addr.clone(),
                    state: if i.stale.contains_key(&r.node) {
                        "stale".into()
                    } else {
                        "unknown".into()
                    },
                    dirty_regions: i.stale.get(&r.node).map(|s| s.len() as u64).unwrap_or(0),
                })
                .collect(),
            snapshots: i.snapshots,
            allocated_bytes: i.allocated_bytes,
            resync_bytes: 0,
            resync_regions: 0,
            repaired_blocks: 0,
            checksum_errors: 0,
            replies_polled: 0,
            replies_caught_polling: 0,
            node: self.engine.node_metrics(),
            encrypted: i.crypt.is_some(),
            key_check: i.crypt.as_ref().map(|c| c.key_check.clone()),
            rekey: i
                .crypt
                .as_ref()
                .and_then(|c| c.rekey.as_ref())
                .map(|r| proto::RekeyStatus {
                    done: r.watermark.min(i.size),
                    total: i.size,
                    next_key_check: r.next_key_check.clone(),
                }),
        })
    }

    /// Handles a request from the local socket (`local`) or another node.
    pub fn handle(&self, req: Request, local: bool, progress: ProgressFn) -> Response {
        if !local && !req.is_replica_op() {
            return Response::Err(
                Error::Invalid("control requests are only served on the local socket".into())
                    .into(),
            );
        }
        Response::from_result(self.dispatch(req, progress))
    }

    /// Serves one connection until it closes or misbehaves.
    pub fn serve_conn(self: &Arc<Self>, mut conn: Box<dyn crate::transport::Conn>, local: bool) {
        loop {
            let frame = match proto::read_frame(&mut conn) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "dropping connection");
                    return;
                }
            };
            let resp = match frame {
                (Kind::Request, mut body) => match proto::decode::<Request>(&body) {
                    Ok(Request::WriteBatch { .. }) if crate::faults::predates_write_batch() => {
                        Response::Err(
                            Error::Protocol("bad message: unknown request (injected fault)".into())
                                .into(),
                        )
                    }
                    Ok(req) => {
                        if req.carries_key() {
                            zeroize::Zeroize::zeroize(&mut body);
                        }
                        let mut sink = ProgressSink {
                            conn: &mut conn,
                            failed: false,
                        };
                        let r = self.handle(req, local, &mut |p| sink.send(p));
                        if sink.failed {
                            return;
                        }
                        r
                    }
                    Err(e) => Response::Err(e.into()),
                },
                _ => Response::Err(Error::Protocol("expected a request".into()).into()),
            };
            if proto::send(&mut conn, Kind::Response, &resp).is_err() {
                return;
            }
        }
    }
}

struct ProgressSink<'a, C: Read + Write + ?Sized> {
    conn: &'a mut C,
    failed: bool,
}

impl<C: Read + Write + ?Sized> ProgressSink<'_, C> {
    fn send(&mut self, p: Progress) {
        if !self.failed && proto::send(&mut self.conn, Kind::Progress, &p).is_err() {
            self.failed = true;
        }
    }
}

/// Starts the daemon: opens the engine, binds the TCP port and the unix
/// socket, and serves both from background threads. The returned daemon
/// gives in-process access to attached volumes ([`Daemon::volume_io`]),
/// e.g. for a vhost-user-blk backend.
pub fn start(cfg: Config) -> Result<Arc<Daemon>> {
    let (connector, transport): (Arc<dyn Connector>, Arc<dyn ServerTransport>) = match &cfg.security
    {
        Security::Tls(files) => {
            let (c, s) = files.load(TcpConnector::default())?;
            (Arc::new(c), Arc::new(s))
        }
        Security::InsecureLoopback => {
            check_loopback(&cfg.listen)?;
            (Arc::new(TcpConnector::default()), Arc::new(PlainServer))
        }
    };
    let engine = Arc::new(Engine::open(&cfg.node_id, &cfg.data)?);
    let daemon = Daemon::new(engine.clone(), connector.clone());
    let tcp = TcpListener::bind(&cfg.listen)
        .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", cfg.listen)))?;
    if socket_in_use(&cfg.socket) {
        return Err(Error::Invalid(format!(
            "{} is in use by another daemon",
            cfg.socket.display()
        )));
    }
    let unix = crate::control_socket::bind(&cfg.socket)?;
    let tls = matches!(cfg.security, Security::Tls(_));
    crate::transport::poll::set_reply_poll(cfg.reply_poll);
    tracing::info!(node = %cfg.node_id, listen = %cfg.listen, tls, socket = %cfg.socket.display(), crc32c = crate::crc::implementation().name(), reply_poll_us = cfg.reply_poll.as_micros() as u64, "kiln-store serving");
    if cfg.scrub_rate > 0 {
        let (d, rate, pause) = (Arc::downgrade(&daemon), cfg.scrub_rate, cfg.scrub_interval);
        std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || scrub::background_scrub(d, rate, pause))?;
    }
    let d = daemon.clone();
    let peer_idle = cfg.peer_idle_timeout;
    std::thread::Builder::new()
        .name("tcp-accept".into())
        .spawn(move || {
            let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for s in tcp.incoming() {
                let Ok(s) = s else { continue };
                let guard = match PeerSlot::take(&open) {
                    Some(g) => g,
                    None => {
                        tracing::warn!(
                            "refusing a connection: {MAX_PEER_CONNECTIONS} peers connected already"
                        );
                        continue;
                    }
                };
                let (d, transport, idle) = (d.clone(), transport.clone(), peer_idle);
                // The handshake runs in the connection's own thread: a
                // peer that stalls in it holds up nobody else.
                let _ = std::thread::Builder::new()
                    .name("peer".into())
                    .spawn(move || {
                        let _slot = guard;
                        match transport.accept(s) {
                            Ok(conn) => {
                                if let Err(e) = conn.set_read_timeout(Some(idle)) {
                                    tracing::warn!(error = %e, "cannot set a read deadline");
                                    return;
                                }
                                d.serve_conn(conn, false)
                            }
                            Err(e) => tracing::warn!(error = %e, "rejected connection"),
                        }
                    });
            }
        })?;
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("unix-accept".into())
        .spawn(move || {
            for s in unix.incoming() {
                let Ok(s) = s else { continue };
                if !crate::control_socket::peer_allowed(&s) {
                    tracing::warn!("refused a control connection from another user");
                    continue;
                }
                let d = d.clone();
                let _ = std::thread::Builder::new()
                    .name("local".into())
                    .spawn(move || d.serve_conn(Box::new(s), true));
            }
        })?;
    Ok(daemon)
}

/// One of the [`MAX_PEER_CONNECTIONS`] places, given back on drop.
struct PeerSlot(Arc<std::sync::atomic::AtomicUsize>);

impl PeerSlot {
    fn take(open: &Arc<std::sync::atomic::AtomicUsize>) -> Option<PeerSlot> {
        use std::sync::atomic::Ordering;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_PEER_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| PeerSlot(open.clone()))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// `--insecure` listens on loopback only: every address `listen` names
/// must be a loopback one.
fn check_loopback(listen: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = listen
        .to_socket_addrs()
        .map_err(|e| Error::Invalid(format!("bad listen address {listen}: {e}")))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(Error::Invalid(format!(
            "--insecure serves plain TCP and listens on loopback only; {listen} is not a \
             loopback address (give --tls-cert, --tls-key and --tls-ca for mutual TLS)"
        )));
    }
    Ok(())
}

/// Runs the daemon until the process is killed.
pub fn serve(cfg: Config) -> Result<()> {
    let _daemon = start(cfg)?;
    loop {
        std::thread::park();
    }
}

/// Does a daemon already listen on this unix socket?
/// What [`Daemon::check_export`] found.
#[derive(Debug, PartialEq, Eq)]
enum ExportCheck {
    /// Exported on that socket with those options already: keep it.
    Unchanged,
    /// A new export (or one that replaces the current one).
    New,
}

pub fn socket_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}
