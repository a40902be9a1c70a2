//! Node-to-node connections: mutual TLS between daemons ([`tls`]), or
//! plain TCP on loopback for experiments ([`tcp`], `serve --insecure`).
//! [`Connector`] dials a peer, [`ServerTransport`] wraps an accepted
//! stream, [`Link`] carries requests over either.

pub mod poll;
pub mod tcp;
pub mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{self, Kind, Progress, Request, Response};

pub use tcp::{PlainServer, TcpConnector};
pub use tls::{TlsConnector, TlsFiles, TlsServer, TlsStream};

/// A bidirectional byte stream (TLS, or plain TCP on loopback, or the
/// local unix socket).
pub trait Conn: Read + Write + Send {
    /// How long a read may wait for the peer (None: for ever).
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    /// Spins until there is something to read or `spin` has passed,
    /// without blocking or consuming anything ([`poll`]); whether there
    /// is. A stream that cannot tell returns false at once.
    fn spin_until_readable(&mut self, _spin: Duration) -> bool {
        false
    }
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }

    fn spin_until_readable(&mut self, spin: Duration) -> bool {
        poll::spin_until_readable(self, spin)
    }
}

impl Conn for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}

/// Opens connections to other nodes.
pub trait Connector: Send + Sync {
    /// Connects to node `node` at `addr`; with TLS, the peer must prove it
    /// is `node` (its certificate names it).
    fn connect(&self, node: &str, addr: &str) -> Result<Box<dyn Conn>>;
}

/// Wraps connections accepted from other nodes (with TLS: the handshake,
/// which refuses a peer without a certificate of this cluster).
pub trait ServerTransport: Send + Sync {
    fn accept(&self, stream: TcpStream) -> Result<Box<dyn Conn>>;
}

/// A client connection that sends requests and waits for their responses.
pub struct Link {
    conn: Box<dyn Conn>,
    /// When the last request went out.
    used: std::time::Instant,
    /// A link to another node: each request's answer is awaited for
    /// [`Request::deadline`] at most.
    deadlines: bool,
    /// The read timeout last set on `conn`: most requests share one
    /// deadline, so the system call is made only when it changes (it was
    /// one of about 30 per replicated write).
    timeout: Option<Duration>,
}

impl Link {
    /// A link on the local socket: answers are awaited for ever (a scrub
    /// or a rebuild reports progress, and may take hours).
    pub fn new(conn: Box<dyn Conn>) -> Link {
        Link {
            conn,
            used: std::time::Instant::now(),
            deadlines: false,
            timeout: None,
        }
    }

    /// A link to another node: a peer that does not answer within the
    /// request's deadline is taken for failed.
    pub fn peer(conn: Box<dyn Conn>) -> Link {
        Link {
            conn,
            used: std::time::Instant::now(),
            deadlines: true,
            timeout: None,
        }
    }

    /// Idle for so long that the peer may have closed it
    /// ([`proto::LINK_MAX_IDLE`]): open a new one instead of reusing it.
    pub fn idle_too_long(&self) -> bool {
        self.used.elapsed() > proto::LINK_MAX_IDLE
    }

    /// Sends `req`; calls `progress` for each progress frame; returns the
    /// response (error responses become `Err`). Transport failures are
    /// `Error::Unavailable` and leave the link unusable.
    pub fn call_with_progress(
        &mut self,
        req: &Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Response> {
        self.send(req)?;
        self.recv_with_progress(progress)
    }

    /// Sends `req` without waiting; [`Link::recv`] reads its response. Lets
    /// a caller have one request in flight on each of several links.
    pub fn send(&mut self, req: &Request) -> Result<()> {
        self.await_for(req.deadline())?;
        self.used = std::time::Instant::now();
        proto::send_request(&mut self.conn, req).map_err(unavailable)
    }

    /// Sends a request encoded already (`proto::encode_request`), so that
    /// one encoding of a write goes to every replica.
    pub fn send_encoded(&mut self, body: &[u8], deadline: Duration) -> Result<()> {
        self.await_for(deadline)?;
        self.used = std::time::Instant::now();
        proto::write_frame(&mut self.conn, Kind::Request, body).map_err(unavailable)
    }

    /// On a link to another node, the next answer is awaited for `deadline`
    /// at most (the timeout is set only if it differs from the last one).
    fn await_for(&mut self, deadline: Duration) -> Result<()> {
        if self.deadlines && self.timeout != Some(deadline) {
            self.conn.set_read_timeout(Some(deadline))?;
            self.timeout = Some(deadline);
        }
        Ok(())
    }

    /// Spins up to `spin` for the answer to arrive ([`poll`]); whether it
    /// did. [`Link::recv`] reads it either way.
    pub fn spin_until_readable(&mut self, spin: Duration) -> bool {
        self.conn.spin_until_readable(spin)
    }

    /// Reads the response to the request last sent.
    pub fn recv(&mut self) -> Result<Response> {
        self.recv_with_progress(&mut |_| {})
    }

    fn recv_with_progress(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<Response> {
        loop {
            let (kind, body) = proto::read_frame(&mut self.conn)
                .map_err(unavailable)?
                .ok_or_else(|| Error::Unavailable("connection closed".into()))?;
            match kind {
                Kind::Progress => progress(proto::decode(&body)?),
                Kind::Response => return proto::decode::<Response>(&body)?.into_result(),
                Kind::Request => return Err(Error::Protocol("unexpected request frame".into())),
            }
        }
    }

    pub fn call(&mut self, req: &Request) -> Result<Response> {
        self.call_with_progress(req, &mut |_| {})
    }
}

fn unavailable(e: Error) -> Error {
    match e {
        Error::Io(s) => Error::Unavailable(s),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A real unix socket that counts the read timeouts set on it.
    struct Counted(UnixStream, Arc<AtomicUsize>);

    impl Read for Counted {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Counted {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    impl Conn for Counted {
        fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.set_read_timeout(d)
        }
    }

    #[test]
    fn a_peer_link_sets_its_read_timeout_only_when_the_deadline_changes() {
        let (a, _b) = UnixStream::pair().unwrap();
        let sets = Arc::new(AtomicUsize::new(0));
        let conn = Counted(a.try_clone().unwrap(), sets.clone());
        let mut link = Link::peer(Box::new(conn));
        let io = Duration::from_secs(5);
        for _ in 0..3 {
            link.send_encoded(b"x", io).unwrap();
        }
        assert_eq!(sets.load(Ordering::Relaxed), 1);
        assert_eq!(a.read_timeout().unwrap(), Some(io));
        // Another deadline is set, and so is the first again after it.
        link.send_encoded(b"x", Duration::from_secs(60)).unwrap();
        assert_eq!(a.read_timeout().unwrap(), Some(Duration::from_secs(60)));
        link.send_encoded(b"x", io).unwrap();
        assert_eq!(sets.load(Ordering::Relaxed), 3);
        assert_eq!(a.read_timeout().unwrap(), Some(io));
    }

    #[test]
    fn a_local_link_never_sets_a_read_timeout() {
        let (a, _b) = UnixStream::pair().unwrap();
        let sets = Arc::new(AtomicUsize::new(0));
        let mut link = Link::new(Box::new(Counted(a.try_clone().unwrap(), sets.clone())));
        link.send_encoded(b"x", Duration::from_secs(5)).unwrap();
        assert_eq!(sets.load(Ordering::Relaxed), 0);
        assert_eq!(a.read_timeout().unwrap(), None);
    }
}
