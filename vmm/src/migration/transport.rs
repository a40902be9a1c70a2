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
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The largest payload a frame may carry (64 MiB).
pub const MAX_FRAME_LEN: u32 = 64 << 20;

/// Frame header: type and length.
const HEADER_LEN: usize = 5;

/// Handshake magic (7 bytes) and handshake version (1 byte).
const MAGIC: &[u8; 8] = b"KILNMIG\x01";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const MODE_OPEN: u8 = 0;
const MODE_SECRET: u8 = 1;
const LABEL_DESTINATION: &[u8] = b"kiln-migration v1 destination proof";
const LABEL_SOURCE: &[u8] = b"kiln-migration v1 source proof";

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

/// A 256-bit shared secret. Never printed.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Secret(bytes)
    }

    /// Reads a secret file: 32 raw bytes, or 64 hex digits (a trailing
    /// newline allowed). The file must not be accessible to group or
    /// others (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Self, TransportError> {
        let err = |reason: String| TransportError::Secret {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!(
                "group or others may access it (mode {:o}); make it 0600",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > 1024 {
            return Err(err("too large for a 256-bit secret".into()));
        }
        let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut key = [0u8; 32];
        if data.len() == 32 {
            key.copy_from_slice(&data);
            return Ok(Secret(key));
        }
        let text = data.strip_suffix(b"\n").unwrap_or(&data);
        if text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit) {
            for (i, pair) in text.chunks(2).enumerate() {
                let s = std::str::from_utf8(pair).map_err(|_| err("not hex".into()))?;
                key[i] = u8::from_str_radix(s, 16).map_err(|_| err("not hex".into()))?;
            }
            return Ok(Secret(key));
        }
        Err(err(
            "expected 32 raw bytes or 64 hex digits (a 256-bit secret)".into(),
        ))
    }

    fn mac(&self, label: &[u8], nonce_src: &[u8], nonce_dst: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(label);
        mac.update(nonce_src);
        mac.update(nonce_dst);
        mac
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference; the
            // volatile write only keeps the compiler from eliding the wipe.
            unsafe { std::ptr::write_volatile(b, 0) };
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

fn io_error(what: impl Into<String>, e: io::Error, timeout: Duration) -> TransportError {
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
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
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
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
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
    stream: Stream,
    timeout: Duration,
    peer: String,
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
        Connection::new(Stream::Unix(stream), timeout, "socketpair".into())
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
        write_all_vectored(&mut self.stream, &mut all)
            .map_err(|e| io_error(format!("sending to {}", self.peer), e, timeout))
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
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

fn write_all_vectored(w: &mut impl Write, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
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

fn read_exact_or_closed(
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
            let mut conn = Connection::new(Stream::Unix(s), timeout, addr.to_string())?;
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
                Connection::new(Stream::Unix(s), io_timeout, self.addr.to_string())?
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

fn check_peer_cred(fd: RawFd) -> Result<(), TransportError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the
    // size of `cred`; `fd` is a connected unix socket we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(TransportError::Io {
            what: "SO_PEERCRED".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let own = unsafe { libc::geteuid() };
    if cred.uid == own || cred.uid == 0 {
        Ok(())
    } else {
        Err(TransportError::PeerNotAllowed {
            uid: cred.uid,
            pid: cred.pid,
            own,
        })
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], TransportError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n)
        .map_err(|e| TransportError::Auth(format!("no random nonce: {e}")))?;
    Ok(n)
}

fn mode_name(mode: u8) -> &'static str {
    match mode {
        MODE_OPEN => "no shared secret",
        MODE_SECRET => "a shared secret",
        _ => "an unknown mode",
    }
}

fn hs_read(conn: &mut Connection, buf: &mut [u8], step: &str) -> Result<(), TransportError> {
    let t = conn.timeout;
    let peer = conn.peer.clone();
    read_exact_or_closed(&mut conn.stream, buf, t, || {
        format!("{peer} during the handshake ({step})")
    })
}

fn hs_write(conn: &mut Connection, buf: &[u8], step: &str) -> Result<(), TransportError> {
    let t = conn.timeout;
    conn.stream
        .write_all(buf)
        .map_err(|e| io_error(format!("{} during the handshake ({step})", conn.peer), e, t))
}

/// Source side: `magic | mode | nonce_s` → `magic | mode | nonce_d |
/// proof_d` → `proof_s` → `ok`.
fn client_handshake(conn: &mut Connection, secret: Option<&Secret>) -> Result<(), TransportError> {
    let mode = if secret.is_some() {
        MODE_SECRET
    } else {
        MODE_OPEN
    };
    let nonce_s = if secret.is_some() {
        nonce()?
    } else {
        [0; NONCE_LEN]
    };
    let mut hello = Vec::with_capacity(8 + 1 + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.push(mode);
    hello.extend_from_slice(&nonce_s);
    hs_write(conn, &hello, "greeting")?;
    let mut answer = [0u8; 8 + 1 + NONCE_LEN + MAC_LEN];
    hs_read(conn, &mut answer, "waiting for the destination's greeting")?;
    if &answer[..8] != MAGIC {
        return Err(TransportError::Auth(format!(
            "{} is not a kiln-vmm migration destination (or a different handshake version)",
            conn.peer
        )));
    }
    if answer[8] != mode {
        return Err(TransportError::Auth(format!(
            "the destination uses {}, this source {}",
            mode_name(answer[8]),
            mode_name(mode)
        )));
    }
    let Some(secret) = secret else {
        return Ok(());
    };
    let nonce_d = &answer[9..9 + NONCE_LEN];
    let proof_d = &answer[9 + NONCE_LEN..];
    secret
        .mac(LABEL_DESTINATION, &nonce_s, nonce_d)
        .verify_slice(proof_d)
        .map_err(|_| {
            TransportError::Auth("the destination does not know the shared secret".into())
        })?;
    let proof_s = secret
        .mac(LABEL_SOURCE, &nonce_s, nonce_d)
        .finalize()
        .into_bytes();
    hs_write(conn, &proof_s, "proof")?;
    let mut ok = [0u8; 1];
    hs_read(
        conn,
        &mut ok,
        "waiting for the destination to accept our proof",
    )
    .map_err(|e| match e {
        TransportError::Closed { .. } => TransportError::Auth(
            "the destination refused our proof of the shared secret (a different secret?)".into(),
        ),
        e => e,
    })?;
    if ok[0] != 1 {
        return Err(TransportError::Auth(
            "the destination refused our proof".into(),
        ));
    }
    Ok(())
}

fn server_handshake(conn: &mut Connection, secret: Option<&Secret>) -> Result<(), TransportError> {
    let mode = if secret.is_some() {
        MODE_SECRET
    } else {
        MODE_OPEN
    };
    let mut hello = [0u8; 8 + 1 + NONCE_LEN];
    hs_read(conn, &mut hello, "waiting for the source's greeting")?;
    if &hello[..8] != MAGIC {
        return Err(TransportError::Auth(format!(
            "{} is not a kiln-vmm migration source (or a different handshake version)",
            conn.peer
        )));
    }
    let nonce_s = &hello[9..];
    let nonce_d = if secret.is_some() {
        nonce()?
    } else {
        [0; NONCE_LEN]
    };
    let mut answer = Vec::with_capacity(8 + 1 + NONCE_LEN + MAC_LEN);
    answer.extend_from_slice(MAGIC);
    answer.push(mode);
    answer.extend_from_slice(&nonce_d);
    match (secret, hello[8] == mode) {
        (Some(secret), true) => {
            let proof = secret.mac(LABEL_DESTINATION, nonce_s, &nonce_d).finalize();
            answer.extend_from_slice(&proof.into_bytes());
        }
        _ => answer.extend_from_slice(&[0; MAC_LEN]),
    }
    hs_write(conn, &answer, "greeting")?;
    if hello[8] != mode {
        return Err(TransportError::Auth(format!(
            "the source uses {}, this destination {}",
            mode_name(hello[8]),
            mode_name(mode)
        )));
    }
    let Some(secret) = secret else {
        return Ok(());
    };
    let mut proof_s = [0u8; MAC_LEN];
    hs_read(conn, &mut proof_s, "waiting for the source's proof").map_err(|e| match e {
        TransportError::Closed { .. } => TransportError::Auth(
            "the source refused our proof of the shared secret (a different secret?)".into(),
        ),
        e => e,
    })?;
    secret
        .mac(LABEL_SOURCE, nonce_s, &nonce_d)
        .verify_slice(&proof_s)
        .map_err(|_| TransportError::Auth("the source does not know the shared secret".into()))?;
    hs_write(conn, &[1], "accepting the proof")
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
