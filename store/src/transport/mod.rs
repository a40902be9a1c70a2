//! Node-to-node connections: mutual TLS between daemons ([`tls`]), or
//! plain TCP on loopback for experiments ([`tcp`], `serve --insecure`).
//! [`Connector`] dials a peer, [`ServerTransport`] wraps an accepted
//! stream, [`Link`] carries requests over either.

pub mod tcp;
pub mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::error::{Error, Result};
use crate::proto::{self, Kind, Progress, Request, Response};

pub use tcp::{PlainServer, TcpConnector};
pub use tls::{TlsConnector, TlsFiles, TlsServer};

/// A bidirectional byte stream (TLS, or plain TCP on loopback).
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

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
