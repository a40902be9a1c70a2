//! The migration channel: where to (`unix:/path`, `tcp:HOST:PORT`), who
//! may connect, and checksummed frames with a timeout on every read and
//! write.
//!
//! A frame is `type (u8) | length (u32 LE) | payload | CRC32C (u32 LE)`,
//! the CRC covering type, length and payload. A length above
//! [`MAX_FRAME_LEN`] is refused before anything is read or allocated, and
//! the payload buffer grows only as bytes actually arrive.
//!
//! Who may connect:
//! - **unix**: local and trusted. The listener creates the socket 0600 in
//!   a directory that only its owner can write (created 0700 when
//!   missing); both ends check the other with `SO_PEERCRED`: same uid, or
//!   root.
//! - **tcp with a shared secret** (256 bits, from a file): before anything
//!   else, both ends prove they know it (HMAC-SHA256 over fresh random
//!   nonces from both sides, one label per direction). This authenticates
//!   the peer at connection time only: **TCP traffic is neither encrypted
//!   nor integrity-protected against an on-path attacker** until mutual TLS
//!   (the cluster's certificates) lands. Use it on a trusted network.
//! - **tcp without a secret**: only when both ends are loopback addresses.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use super::auth::Secret;
use super::auth::{check_peer_cred, client_handshake, server_handshake};

/// The largest payload a frame may carry (64 MiB).
pub const MAX_FRAME_LEN: u32 = 64 << 20;

/// Frame header: type and length.
const HEADER_LEN: usize = 5;

/// Where the destination listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `unix:/path`: a Unix socket.
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (`tcp:[::1]:PORT` for an IPv6 literal).
    Tcp { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("migration address {0:?}: expected unix:/path or tcp:HOST:PORT")]
    Scheme(String),
    #[error("migration address {0:?}: the socket path is empty")]
    EmptyPath(String),
    #[error("migration address {0:?}: expected tcp:HOST:PORT (a port after the last ':')")]
    NoPort(String),
    #[error("migration address {0:?}: the host is empty")]
    EmptyHost(String),
    #[error("migration address {0:?}: the port must be a number up to 65535 (0: any, to listen)")]
    BadPort(String),
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddressError::EmptyPath(s.into()));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(AddressError::Scheme(s.into()));
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(AddressError::NoPort(s.into()));
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(AddressError::EmptyHost(s.into()));
        }
        match port.parse::<u16>() {
            Ok(port) => Ok(Address::Tcp {
                host: host.into(),
                port,
            }),
            Err(_) => Err(AddressError::BadPort(s.into())),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// How both ends run the channel.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Limit on every read and write (and on a TCP connect).
    pub io_timeout: Duration,
    /// The shared secret for TCP; `None`: TCP only between loopback
    /// addresses. Ignored for unix sockets.
    pub secret: Option<Secret>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            io_timeout: Duration::from_secs(30),
            secret: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("the peer closed the connection ({what})")]
    Closed { what: String },
    #[error("frame of type {ty} failed its checksum (CRC32C {actual:#010x}, expected {expected:#010x}): corrupt data on the wire")]
    Checksum { ty: u8, expected: u32, actual: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame of type {ty} announces {len} bytes, more than the {MAX_FRAME_LEN}-byte limit")]
    Oversize { ty: u8, len: u32 },
    #[error(
        "refused a unix-socket peer of uid {uid} (pid {pid}): only uid {own} or root may take part"
    )]
    PeerNotAllowed { uid: u32, pid: i32, own: u32 },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("tcp without a shared secret is allowed only between loopback addresses: {0}")]
    NotLoopback(String),
    #[error("secret file {}: {reason}", path.display())]
    Secret { path: PathBuf, reason: String },
    #[error("unix socket {}: {reason}", path.display())]
    SocketDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Bind(#[from] crate::socket::Error),
    #[error("handing over descriptors: {0}")]
    Fds(String),
}

impl TransportError {
    /// A peer turned away at the door (wrong uid, address or secret, or
    /// not speaking the handshake): a listener may wait for another.
    pub fn is_rejected_peer(&self) -> bool {
        matches!(
            self,
            TransportError::PeerNotAllowed { .. }
                | TransportError::Auth(_)
                | TransportError::NotLoopback(_)
                | TransportError::Closed { .. }
        )
    }
}

pub(super) fn io_error(what: impl Into<String>, e: io::Error, timeout: Duration) -> TransportError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
            what: what.into(),
            timeout,
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TransportError::Closed {
            what: format!("{}: {e}", what.into()),
        },
        _ => TransportError::Io {
            what: what.into(),
            source: e,
        },
    }
}

#[derive(Debug)]
pub(super) enum Stream {
    /// A unix socket, with the descriptors that came with what was read
    /// and are not taken yet ([`Connection::take_fds`]).
    Unix(UnixStream, Vec<OwnedFd>),
    Tcp(TcpStream),
}

/// The most descriptors one read takes in (more are closed by the kernel).
const MAX_FDS_PER_READ: usize = 16;
/// The most descriptors a connection keeps waiting to be taken.
const MAX_PENDING_FDS: usize = 64;

/// Reads from a unix socket, keeping the descriptors that come along.
fn read_unix(s: &UnixStream, fds: &mut Vec<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut raw = [-1 as RawFd; MAX_FDS_PER_READ];
    // SAFETY: the one iovec points at `buf`, which is ours to fill for
    // its whole length; `raw` has room for the descriptors asked for.
    let (n, count) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for &fd in &raw[..count.min(MAX_FDS_PER_READ)] {
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if fds.len() < MAX_PENDING_FDS {
            fds.push(fd);
        }
    }
    Ok(n)
}

/// What a frame is written to: a stream whose send timeout can be set.
trait FrameSink: Write {
    fn set_send_timeout(&self, t: Duration) -> io::Result<()>;
}

impl FrameSink for Stream {
    fn set_send_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s, _) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s, _) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                s.set_nodelay(true)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s, fds) => read_unix(s, fds, buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s, _) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s, _) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub ty: u8,
    pub payload: Vec<u8>,
}

/// An established, authenticated channel to the peer.
#[derive(Debug)]
pub struct Connection {
    pub(super) stream: Stream,
    pub(super) timeout: Duration,
    pub(super) peer: String,
}

impl Connection {
    fn new(stream: Stream, timeout: Duration, peer: String) -> Result<Self, TransportError> {
        stream
            .set_timeouts(timeout)
            .map_err(|e| io_error(format!("cannot set timeouts on {peer}"), e, timeout))?;
        Ok(Connection {
            stream,
            timeout,
            peer,
        })
    }

    /// A connection over one end of a connected unix socket pair, with no
    /// handshake (tests, benchmarks).
    pub fn from_unix_stream(stream: UnixStream, timeout: Duration) -> Result<Self, TransportError> {
        Connection::new(
            Stream::Unix(stream, Vec::new()),
            timeout,
            "socketpair".into(),
        )
    }

    /// Who is at the other end (for messages).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn io_timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the limit on each read and write from now on.
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.stream
            .set_timeouts(timeout)
            .map_err(|e| io_error("cannot set timeouts", e, timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends one frame.
    pub fn send_frame(&mut self, ty: u8, payload: &[u8]) -> Result<(), TransportError> {
        self.send_frame_parts(ty, &[payload])
    }

    /// Sends one frame whose payload is `parts` laid end to end (no copy).
    pub fn send_frame_parts(&mut self, ty: u8, parts: &[&[u8]]) -> Result<(), TransportError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(total)
            .ok()
            .filter(|&l| l <= MAX_FRAME_LEN)
            .ok_or(TransportError::Oversize {
                ty,
                len: total.min(u32::MAX as usize) as u32,
            })?;
        let mut header = [0u8; HEADER_LEN];
        header[0] = ty;
        header[1..].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32c::crc32c(&header);
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        let crc = crc.to_le_bytes();
        let timeout = self.timeout;
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 2);
        all.push(&header);
        all.extend_from_slice(parts);
        all.push(&crc);
        write_all_vectored(&mut self.stream, &mut all, timeout)
            .map_err(|e| io_error(format!("sending to {}", self.peer), e, timeout))
    }

    /// Whether descriptors can go over this connection (a unix socket:
    /// both ends on this host).
    pub fn carries_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(..))
    }

    /// Sends one frame with `fds` attached (`SCM_RIGHTS`); the peer finds
    /// them with [`Connection::take_fds`] once it has read the frame.
    /// Only over a unix socket.
    pub fn send_frame_with_fds(
        &mut self,
        ty: u8,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), TransportError> {
        if fds.len() > MAX_FDS_PER_READ {
            return Err(TransportError::Fds(format!(
                "{} descriptors in one frame (at most {MAX_FDS_PER_READ})",
                fds.len()
            )));
        }
        let Stream::Unix(s, _) = &self.stream else {
            return Err(TransportError::Fds("descriptors cannot go over TCP".into()));
        };
        // The header's first byte carries the descriptors; the rest of
        // the frame follows as usual.
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_FRAME_LEN)
            .ok_or(TransportError::Oversize {
                ty,
                len: payload.len().min(u32::MAX as usize) as u32,
            })?;
        let mut header = [0u8; HEADER_LEN];
        header[0] = ty;
        header[1..].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header), payload).to_le_bytes();
        let timeout = self.timeout;
        let peer = self.peer.clone();
        s.send_with_fds(&[&header[..1]], fds).map_err(|e| {
            io_error(
                format!("sending to {peer}"),
                io::Error::from_raw_os_error(e.errno()),
                timeout,
            )
        })?;
        let mut rest: Vec<&[u8]> = vec![&header[1..], payload, &crc];
        write_all_vectored(&mut self.stream, &mut rest, timeout)
            .map_err(|e| io_error(format!("sending to {peer}"), e, timeout))
    }

    /// The descriptors received so far and not taken yet, oldest first.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        match &mut self.stream {
            Stream::Unix(_, fds) => std::mem::take(fds),
            Stream::Tcp(_) => Vec::new(),
        }
    }

    /// Receives one frame whose type `known` accepts. An unknown type, an
    /// oversize length or a bad checksum is an error; EOF is
    /// [`TransportError::Closed`].
    pub fn recv_frame(&mut self, known: impl Fn(u8) -> bool) -> Result<Frame, TransportError> {
        let timeout = self.timeout;
        let mut header = [0u8; HEADER_LEN];
        let peer = self.peer.clone();
        read_exact_or_closed(&mut self.stream, &mut header, timeout, || {
            format!("reading from {peer}")
        })?;
        let ty = header[0];
        let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes"));
        if !known(ty) {
            return Err(TransportError::UnknownType(ty));
        }
        if len > MAX_FRAME_LEN {
            return Err(TransportError::Oversize { ty, len });
        }
        // Grows as data arrives: a peer announcing 64 MiB and sending
        // nothing costs nothing.
        let mut payload = Vec::with_capacity((len as usize).min(1 << 20));
        let got = (&mut self.stream)
            .take(u64::from(len))
            .read_to_end(&mut payload)
            .map_err(|e| io_error(format!("reading from {peer}"), e, timeout))?;
        if got != len as usize {
            return Err(TransportError::Closed {
                what: format!("{peer} closed mid-frame"),
            });
        }
        let mut crc = [0u8; 4];
        read_exact_or_closed(&mut self.stream, &mut crc, timeout, || {
            format!("reading from {peer}")
        })?;
        let expected = u32::from_le_bytes(crc);
        let actual = crc32c::crc32c_append(crc32c::crc32c(&header), &payload);
        if actual != expected {
            return Err(TransportError::Checksum {
                ty,
                expected,
                actual,
            });
        }
        Ok(Frame { ty, payload })
    }

    /// Closes both directions now (the peer sees EOF).
    pub fn shutdown(&self) {
        let _ = match &self.stream {
            Stream::Unix(s, _) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// Writes every part, in order, within `timeout` plus a second per MiB.
/// A send timeout alone bounds each call, but a call that sent a little
/// before the peer stopped reading (a cut link: no reset, no acks)
/// returns that little after waiting the whole timeout, and the next call
/// would wait it again: each call gets only what is left of the frame's
/// deadline. The socket's send timeout is `timeout` again afterwards.
fn write_all_vectored(
    w: &mut impl FrameSink,
    parts: &mut [&[u8]],
    timeout: Duration,
) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let deadline = Instant::now() + timeout + Duration::from_secs((total >> 20) as u64);
    let result = write_before(w, parts, timeout, deadline);
    w.set_send_timeout(timeout)?;
    result
}

fn write_before(
    w: &mut impl FrameSink,
    parts: &mut [&[u8]],
    timeout: Duration,
    deadline: Instant,
) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        w.set_send_timeout(left.min(timeout))?;
        if parts[first].is_empty() {
            first += 1;
            continue;
        }
        let slices: Vec<io::IoSlice<'_>> =
            parts[first..].iter().map(|p| io::IoSlice::new(p)).collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let take = n.min(parts[first].len());
            parts[first] = &parts[first][take..];
            n -= take;
            if parts[first].is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

pub(super) fn read_exact_or_closed(
    r: &mut impl Read,
    buf: &mut [u8],
    timeout: Duration,
    what: impl Fn() -> String,
) -> Result<(), TransportError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => TransportError::Closed { what: what() },
        _ => io_error(what(), e, timeout),
    })
}

/// Connects to a listening destination and authenticates.
pub fn connect(addr: &Address, cfg: &TransportConfig) -> Result<Connection, TransportError> {
    let timeout = cfg.io_timeout;
    match addr {
        Address::Unix(path) => {
            let s = UnixStream::connect(path)
                .map_err(|e| io_error(format!("cannot connect to {addr}"), e, timeout))?;
            check_peer_cred(s.as_raw_fd())?;
            let mut conn = Connection::new(Stream::Unix(s, Vec::new()), timeout, addr.to_string())?;
            client_handshake(&mut conn, None)?;
            Ok(conn)
        }
        Address::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| io_error(format!("cannot resolve {addr}"), e, timeout))?
                .collect();
            if cfg.secret.is_none() {
                if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                    return Err(TransportError::NotLoopback(format!(
                        "{addr} is {}; give both ends a shared secret",
                        a.ip()
                    )));
                }
            }
            let mut last = None;
            let mut stream = None;
            for a in &addrs {
                match TcpStream::connect_timeout(a, timeout) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = stream.ok_or_else(|| {
                io_error(
                    format!("cannot connect to {addr}"),
                    last.unwrap_or_else(|| io::Error::other("resolves to no address")),
                    timeout,
                )
            })?;
            if cfg.secret.is_none() {
                check_loopback_ends(&s)?;
            }
            let mut conn = Connection::new(Stream::Tcp(s), timeout, addr.to_string())?;
            client_handshake(&mut conn, cfg.secret.as_ref())?;
            Ok(conn)
        }
    }
}

fn check_loopback_ends(s: &TcpStream) -> Result<(), TransportError> {
    let ends = (s.local_addr(), s.peer_addr());
    match ends {
        (Ok(l), Ok(p)) if l.ip().is_loopback() && p.ip().is_loopback() => Ok(()),
        (l, p) => Err(TransportError::NotLoopback(format!(
            "connection {} -> {}",
            l.map(|a| a.to_string()).unwrap_or_default(),
            p.map(|a| a.to_string()).unwrap_or_default()
        ))),
    }
}

#[derive(Debug)]
enum ListenerInner {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A destination waiting for its one source.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    cfg: TransportConfig,
    addr: Address,
}

impl Listener {
    /// Listens at `addr`. A unix socket is created 0600 (a stale one
    /// replaced) in a directory only its owner can write, created 0700 if
    /// missing. TCP without a secret must bind a loopback address.
    pub fn bind(addr: &Address, cfg: &TransportConfig) -> Result<Self, TransportError> {
        let timeout = cfg.io_timeout;
        let inner = match addr {
            Address::Unix(path) => {
                prepare_socket_dir(path)?;
                let l = crate::socket::bind("--incoming", path)?;
                ListenerInner::Unix(l, path.clone())
            }
            Address::Tcp { host, port } => {
                let ip: Option<IpAddr> = host.parse().ok();
                let a: SocketAddr = match ip {
                    Some(ip) => SocketAddr::new(ip, *port),
                    None => (host.as_str(), *port)
                        .to_socket_addrs()
                        .map_err(|e| io_error(format!("cannot resolve {addr}"), e, timeout))?
                        .next()
                        .ok_or_else(|| TransportError::Io {
                            what: format!("cannot resolve {addr}"),
                            source: io::Error::other("no address"),
                        })?,
                };
                if cfg.secret.is_none() && !a.ip().is_loopback() {
                    return Err(TransportError::NotLoopback(format!(
                        "cannot listen on {a} without a shared secret"
                    )));
                }
                let l = TcpListener::bind(a)
                    .map_err(|e| io_error(format!("cannot listen on {addr}"), e, timeout))?;
                ListenerInner::Tcp(l)
            }
        };
        Ok(Listener {
            inner,
            cfg: cfg.clone(),
            addr: addr.clone(),
        })
    }

    /// The address actually bound (the port chosen for `tcp:...:0`).
    pub fn local_address(&self) -> Address {
        match &self.inner {
            ListenerInner::Unix(_, p) => Address::Unix(p.clone()),
            ListenerInner::Tcp(l) => match l.local_addr() {
                Ok(a) => Address::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                },
                Err(_) => self.addr.clone(),
            },
        }
    }

    /// Waits up to `timeout` for one peer, checks who it is and runs the
    /// handshake.
    pub fn accept(&self, timeout: Duration) -> Result<Connection, TransportError> {
        let fd = match &self.inner {
            ListenerInner::Unix(l, _) => l.as_raw_fd(),
            ListenerInner::Tcp(l) => l.as_raw_fd(),
        };
        wait_readable(fd, timeout)
            .map_err(|e| io_error(format!("waiting for a source on {}", self.addr), e, timeout))?;
        let io_timeout = self.cfg.io_timeout;
        let what = || format!("accepting on {}", self.addr);
        let mut conn = match &self.inner {
            ListenerInner::Unix(l, _) => {
                let (s, _) = l.accept().map_err(|e| io_error(what(), e, io_timeout))?;
                check_peer_cred(s.as_raw_fd())?;
                Connection::new(
                    Stream::Unix(s, Vec::new()),
                    io_timeout,
                    self.addr.to_string(),
                )?
            }
            ListenerInner::Tcp(l) => {
                let (s, peer) = l.accept().map_err(|e| io_error(what(), e, io_timeout))?;
                if self.cfg.secret.is_none() {
                    check_loopback_ends(&s)?;
                }
                Connection::new(Stream::Tcp(s), io_timeout, format!("tcp:{peer}"))?
            }
        };
        let secret = match self.inner {
            ListenerInner::Unix(..) => None,
            ListenerInner::Tcp(_) => self.cfg.secret.as_ref(),
        };
        server_handshake(&mut conn, secret)?;
        Ok(conn)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, path) = &self.inner {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn prepare_socket_dir(path: &Path) -> Result<(), TransportError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let err = |reason: String| TransportError::SocketDir {
        path: path.to_owned(),
        reason,
    };
    match std::fs::metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| err(format!("cannot create {} (0700): {e}", dir.display())))
            .and_then(|()| {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| err(format!("cannot make {} 0700: {e}", dir.display())))
            }),
        Err(e) => Err(err(format!("cannot inspect {}: {e}", dir.display()))),
        Ok(m) => {
            // SAFETY: geteuid has no arguments and cannot fail.
            let uid = unsafe { libc::geteuid() };
            if m.uid() != uid && m.uid() != 0 {
                return Err(err(format!(
                    "{} belongs to uid {}, not to us ({uid}) or root",
                    dir.display(),
                    m.uid()
                )));
            }
            if m.mode() & 0o022 != 0 {
                return Err(err(format!(
                    "{} is writable by group or others (mode {:o}); use a private directory",
                    dir.display(),
                    m.mode() & 0o7777
                )));
            }
            Ok(())
        }
    }
}

fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Measures frame throughput over a unix socket pair: sends `total` bytes
/// in frames of `frame_len` bytes (checksummed on both sides) and returns
/// bytes per second. No assertion is made on the result.
pub fn unix_throughput(total: u64, frame_len: usize) -> Result<f64, TransportError> {
    let frame_len = frame_len.clamp(1, MAX_FRAME_LEN as usize);
    let (a, b) = UnixStream::pair().map_err(|e| TransportError::Io {
        what: "socketpair".into(),
        source: e,
    })?;
    let timeout = Duration::from_secs(30);
    let mut tx = Connection::from_unix_stream(a, timeout)?;
    let mut rx = Connection::from_unix_stream(b, timeout)?;
    let frames = total.div_ceil(frame_len as u64);
    let start = Instant::now();
    let reader = std::thread::spawn(move || -> Result<u64, TransportError> {
        let mut got = 0u64;
        for _ in 0..frames {
            got += rx.recv_frame(|t| t == 1)?.payload.len() as u64;
        }
        Ok(got)
    });
    let payload = vec![0x5au8; frame_len];
    for _ in 0..frames {
        tx.send_frame(1, &payload)?;
    }
    let got = reader.join().map_err(|_| TransportError::Io {
        what: "benchmark reader".into(),
        source: io::Error::other("the thread panicked"),
    })??;
    Ok(got as f64 / start.elapsed().as_secs_f64().max(1e-9))
}
