//! Plain TCP: only for `serve --insecure`, which listens on loopback.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{Conn, Connector, ServerTransport};
use crate::error::{Error, Result};

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
            io_timeout: crate::proto::IO_DEADLINE,
        }
    }
}

impl TcpConnector {
    /// A TCP connection to `addr` with this connector's timeouts.
    pub fn dial(&self, addr: &str) -> Result<TcpStream> {
        let sa: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| Error::Unavailable(format!("{addr}: {e}")))?
            .next()
            .ok_or_else(|| Error::Unavailable(format!("{addr}: no address")))?;
        let s = TcpStream::connect_timeout(&sa, self.connect_timeout)
            .map_err(|e| Error::Unavailable(format!("{addr}: {e}")))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        Ok(s)
    }
}

impl Connector for TcpConnector {
    fn connect(&self, _node: &str, addr: &str) -> Result<Box<dyn Conn>> {
        Ok(Box::new(self.dial(addr)?))
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
