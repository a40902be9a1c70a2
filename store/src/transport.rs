//! Node-to-node connections. [`Connector`] is the seam where mTLS will go:
//! today [`TcpConnector`] dials plain TCP, and the server side wraps each
//! accepted stream with a [`ServerTransport`].

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{self, Kind, Progress, Request, Response};

/// A bidirectional byte stream (plain TCP today, TLS later).
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// Opens connections to other nodes.
pub trait Connector: Send + Sync {
    fn connect(&self, addr: &str) -> Result<Box<dyn Conn>>;
}

/// Wraps connections accepted from other nodes (authenticates them, later).
pub trait ServerTransport: Send + Sync {
    fn accept(&self, stream: TcpStream) -> Result<Box<dyn Conn>>;
}

/// Plain TCP with timeouts: a replica that does not answer within
/// `io_timeout` is treated as failed.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

impl Default for TcpConnector {
    fn default() -> Self {
        TcpConnector {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(3),
        }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, addr: &str) -> Result<Box<dyn Conn>> {
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| Error::Unavailable(format!("{addr}: {e}")))?
            .next()
            .ok_or_else(|| Error::Unavailable(format!("{addr}: no address")))?;
        let s = TcpStream::connect_timeout(&sa, self.connect_timeout)
            .map_err(|e| Error::Unavailable(format!("{addr}: {e}")))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        Ok(Box::new(s))
    }
}

/// Accepts plain TCP.
pub struct PlainServer;

impl ServerTransport for PlainServer {
    fn accept(&self, stream: TcpStream) -> Result<Box<dyn Conn>> {
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }
}

/// A client connection that sends requests and waits for their responses.
pub struct Link {
    conn: Box<dyn Conn>,
}

impl Link {
    pub fn new(conn: Box<dyn Conn>) -> Link {
        Link { conn }
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
        proto::send(&mut self.conn, Kind::Request, req).map_err(unavailable)
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
