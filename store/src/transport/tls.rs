//! Mutual TLS between daemons (rustls, TLS 1.3 only). Each daemon has a
//! key and a certificate; both ends must present a certificate that chains
//! to the configured CA, and a daemon dialling node `n` accepts only a
//! certificate that names `n` (as a DNS subject alternative name), so a
//! node cannot pose as another. The host agent issues these (its node CA
//! makes them at `kiln-agent init`; in a cluster, the cluster CA).

use std::io::{BufReader, IoSlice, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{ConnectionCommon, SideData, Stream, StreamOwned, ALL_VERSIONS};

use super::tcp::TcpConnector;
use super::{Conn, Connector, ServerTransport};
use crate::error::{Error, Result};

/// A peer that has not finished its handshake within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a daemon's TLS identity lives (`serve --tls-cert --tls-key
/// --tls-ca`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This node's certificate (PEM; may be followed by intermediates).
    pub cert: PathBuf,
    /// Its private key (PEM); must not be readable by group or others.
    pub key: PathBuf,
    /// The CA certificate(s) peers' certificates must chain to (PEM).
    pub ca: PathBuf,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {what}", path.display()))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| invalid(path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let meta = std::fs::metadata(path).map_err(|e| invalid(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            path,
            format!("a private key readable by others (mode {mode:o}); chmod 600 it"),
        ));
    }
    let pem = std::fs::read(path).map_err(|e| invalid(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| invalid(path, format!("bad private key: {e}")))?
        .ok_or_else(|| invalid(path, "no private key in it"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls13() -> Vec<&'static rustls::SupportedProtocolVersion> {
    ALL_VERSIONS
        .iter()
        .copied()
        .filter(|v| v.version == rustls::ProtocolVersion::TLSv1_3)
        .collect()
}

impl TlsFiles {
    /// The `serve` flags that name these files.
    pub fn serve_args(&self) -> [std::ffi::OsString; 6] {
        [
            "--tls-cert".into(),
            self.cert.clone().into(),
            "--tls-key".into(),
            self.key.clone().into(),
            "--tls-ca".into(),
            self.ca.clone().into(),
        ]
    }

    /// Loads the identity and the CA, for both ends: the connector that
    /// dials peers and the server side of the replication port.
    pub fn load(&self, tcp: TcpConnector) -> Result<(TlsConnector, TlsServer)> {
        let certs = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let mut roots = RootCertStore::empty();
        for c in load_certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| invalid(&self.ca, format!("bad CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let tls_err = |e: rustls::Error| invalid(&self.cert, e);
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&tls13())
            .map_err(tls_err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(|e| invalid(&self.key, format!("does not match the certificate: {e}")))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| invalid(&self.ca, e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&tls13())
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| invalid(&self.key, format!("does not match the certificate: {e}")))?;
        Ok((
            TlsConnector {
                tcp,
                config: Arc::new(client),
            },
            TlsServer {
                config: Arc::new(server),
            },
        ))
    }
}

/// Dials peers over mutual TLS.
pub struct TlsConnector {
    tcp: TcpConnector,
    config: Arc<ClientConfig>,
}

impl Connector for TlsConnector {
    fn connect(&self, node: &str, addr: &str) -> Result<Box<dyn Conn>> {
        let name = ServerName::try_from(node.to_string()).map_err(|_| {
            Error::Invalid(format!(
                "node id {node:?} is not a name a certificate can carry"
            ))
        })?;
        let failed = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("TLS with node {node} at {addr}: {e}"))
        };
        let tcp = self.tcp.dial(addr)?;
        let conn = ClientConnection::new(self.config.clone(), name).map_err(|e| failed(&e))?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| failed(&e))?;
        }
        Ok(Box::new(TlsStream::new(s).map_err(|e| failed(&e))?))
    }
}

/// A TLS connection over TCP. rustls's `StreamOwned` has no vectored
/// write of its own, so a frame's header and body went out as two TLS
/// records and two system calls; here they are one of each. Reads go
/// through [`BufferedSocket`].
pub struct TlsStream<C>(StreamOwned<C, BufferedSocket<TcpStream>>);

impl<C> TlsStream<C> {
    /// A connection whose handshake may still be ahead (rustls completes
    /// it on first use).
    pub fn new(s: StreamOwned<C, TcpStream>) -> std::io::Result<TlsStream<C>> {
        let StreamOwned { conn, sock } = s;
        let sock = BufferedSocket::new(sock)?;
        Ok(TlsStream(StreamOwned { conn, sock }))
    }
}

/// How much a [`BufferedSocket`] reads from the kernel at once: a few of
/// the largest TLS records (16 KiB of data each).
pub const READ_BUFFER: usize = 64 * 1024;

/// The socket under rustls. rustls reads at most 4 KiB past what it holds,
/// so a 4 KiB write (one record of a little over 4 KiB) took two `recvfrom`
/// calls; through this buffer it takes one, and a burst of records takes
/// one too. Writes go straight to the socket. The buffer holds only
/// ciphertext, and nothing outside rustls reads this socket or polls it.
pub struct BufferedSocket<S> {
    rd: BufReader<S>,
    wr: S,
}

impl BufferedSocket<TcpStream> {
    /// Reads and writes on two descriptors of one socket (its options, such
    /// as the read timeout, are shared).
    pub fn new(sock: TcpStream) -> std::io::Result<BufferedSocket<TcpStream>> {
        Ok(BufferedSocket::split(sock.try_clone()?, sock))
    }
}

impl<S: Read> BufferedSocket<S> {
    /// `rd` and `wr` are the same connection.
    pub fn split(rd: S, wr: S) -> BufferedSocket<S> {
        BufferedSocket {
            rd: BufReader::with_capacity(READ_BUFFER, rd),
            wr,
        }
    }

    /// The writing end (where socket options are set).
    pub fn socket(&self) -> &S {
        &self.wr
    }
}

impl<S: Read> Read for BufferedSocket<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.rd.read(buf)
    }
}

impl<S: Write> Write for BufferedSocket<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.wr.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.wr.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.wr.flush()
    }
}

impl<C, S> Read for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<C, S> Write for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        Stream::new(&mut self.0.conn, &mut self.0.sock).write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<C, S> Conn for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + Send,
    S: SideData,
{
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.0.sock.socket().set_read_timeout(d)
    }

    fn spin_until_readable(&mut self, spin: Duration) -> bool {
        // What rustls or the read buffer hold already is there to read.
        if !self.0.sock.rd.buffer().is_empty() {
            return true;
        }
        match self.0.conn.process_new_packets() {
            Ok(io) if io.plaintext_bytes_to_read() == 0 && !io.peer_has_closed() => {}
            // Data, or an error the read will report.
            _ => return true,
        }
        super::poll::spin_until_readable(self.0.sock.socket(), spin)
    }
}

/// The server side: completes the handshake (in the connection's own
/// thread, within [`HANDSHAKE_TIMEOUT`]), refusing peers whose certificate
/// does not chain to the CA.
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl ServerTransport for TlsServer {
    fn accept(&self, stream: TcpStream) -> Result<Box<dyn Conn>> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let conn = ServerConnection::new(self.config.clone())
            .map_err(|e| Error::Io(format!("TLS: {e}")))?;
        let mut s = StreamOwned::new(conn, stream);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| {
                Error::Unavailable(format!("TLS handshake with {peer} failed: {e}"))
            })?;
        }
        // Peers keep links open between requests.
        s.sock.set_read_timeout(None)?;
        Ok(Box::new(TlsStream::new(s)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A real unix socket that counts the reads made on it.
    struct Counted<'a>(UnixStream, &'a AtomicUsize);

    impl Read for Counted<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read(b)
        }
    }

    impl Write for Counted<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> std::io::Result<usize> {
            self.0.write_vectored(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_of_over_4_kib_read_in_4_kib_pieces_cost_one_read_of_the_socket() {
        let (a, mut peer) = UnixStream::pair().unwrap();
        let reads = AtomicUsize::new(0);
        let mut s =
            BufferedSocket::split(Counted(a.try_clone().unwrap(), &reads), Counted(a, &reads));
        // Three records as a 4 KiB replicated write makes them.
        let sent: Vec<u8> = (0..3 * 4200u32).map(|i| i as u8).collect();
        peer.write_all(&sent).unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 4096]; // what rustls asks for at a time
        while got.len() < sent.len() {
            let n = s.read(&mut piece).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(reads.load(Ordering::Relaxed), 1);

        // Writes go straight through, vectored ones whole.
        let n = s
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"body")])
            .unwrap();
        assert_eq!(n, 8);
        let mut back = [0u8; 8];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"headbody");
    }
}
