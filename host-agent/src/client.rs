//! One HTTP/1.1 client for everything the agent side talks to: kiln-vmm's
//! API socket, and (from kilnctl) the agent over its unix socket or TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

/// Where a server is.
#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tls {
        /// `host:port`
        addr: String,
        host: String,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Endpoint {
    /// `unix:PATH` or `https://HOST:PORT` (then `ca` is the CA to trust).
    pub fn parse(s: &str, ca: Option<&Path>) -> Result<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = s.strip_prefix("https://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p),
                _ => (rest, "7443"),
            };
            let port: u16 = port.parse().map_err(|_| anyhow!("bad port in {s:?}"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let ca = ca.ok_or_else(|| anyhow!("https needs --ca (the node's CA certificate, /etc/kiln/pki/ca.crt on the node)"))?;
            let config = Arc::new(crate::pki::client_config(ca)?);
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            return Ok(Endpoint::Tls { addr, host, config });
        }
        bail!("bad --host {s:?}: use unix:PATH or https://HOST:PORT")
    }
}

/// A request body: bytes in memory, or a stream (an upload).
pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Opens a connection and sends one request; the response body is left to
/// the caller (it may be a stream).
pub async fn send(
    ep: &Endpoint,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
    connect_timeout: Duration,
) -> Result<Response<Incoming>> {
    let content_type = body.as_ref().map(|_| "application/json");
    let body = Full::new(Bytes::from(body.unwrap_or_default()))
        .map_err(|never| match never {})
        .boxed();
    send_body(
        ep,
        method,
        path,
        headers,
        content_type,
        body,
        connect_timeout,
    )
    .await
}

/// [`send`] with any body, e.g. a file streamed as it is read.
pub async fn send_body(
    ep: &Endpoint,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    content_type: Option<&str>,
    body: ReqBody,
    connect_timeout: Duration,
) -> Result<Response<Incoming>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    if let Some(t) = content_type {
        b = b.header("content-type", t);
    }
    let req = b.body(body)?;
    match ep {
        Endpoint::Unix(p) => {
            let s = tokio::time::timeout(connect_timeout, UnixStream::connect(p))
                .await
                .map_err(|_| anyhow!("timed out connecting to {}", p.display()))?
                .with_context(|| format!("cannot connect to {}", p.display()))?;
            exchange(s, req).await
        }
        Endpoint::Tls { addr, host, config } => {
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| anyhow!("timed out connecting to {addr}"))?
                .with_context(|| format!("cannot connect to {addr}"))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| anyhow!("bad host name {host:?}"))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {addr} failed"))?;
            exchange(tls, req).await
        }
    }
}

async fn exchange<S>(s: S, req: Request<ReqBody>) -> Result<Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.map_err(|e| {
        let closed = std::error::Error::source(&e)
            .and_then(|c| c.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                )
            });
        if closed || e.is_incomplete_message() {
            // The agent reads at most a few MiB of a body it refused
            // (api::linger); a longer one loses the answer.
            anyhow::Error::new(e).context(
                "the agent closed the connection before the request was sent whole \
                 (it refused it, or stopped)",
            )
        } else {
            e.into()
        }
    })
}

/// Sends a request and reads the whole response, within `timeout`.
pub async fn call(
    ep: &Endpoint,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes)> {
    tokio::time::timeout(timeout, async {
        let resp = send(ep, method, path, headers, body, timeout).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    })
    .await
    .map_err(|_| anyhow!("no answer within {} s", timeout.as_secs()))?
}

/// A WebSocket over an upgraded connection (unix socket or TLS alike).
pub type WebSocket = tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What a WebSocket upgrade request got.
pub enum Upgrade {
    /// 101: the connection is now a WebSocket.
    Open(Box<WebSocket>),
    /// Any other answer, with its whole body (the API's JSON error).
    Refused(StatusCode, Bytes),
}

/// Opens a WebSocket on `path` (a GET with the upgrade headers) over the
/// same connection code as [`send`]; `timeout` bounds the handshake.
pub async fn websocket(
    ep: &Endpoint,
    path: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<Upgrade> {
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let key = generate_key();
    let mut all: Vec<(&str, String)> = vec![
        ("connection", "upgrade".into()),
        ("upgrade", "websocket".into()),
        ("sec-websocket-version", "13".into()),
        ("sec-websocket-key", key.clone()),
    ];
    all.extend(headers.iter().cloned());
    tokio::time::timeout(timeout, async {
        let resp = send(ep, Method::GET, path, &all, None, timeout).await?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let body = resp.into_body().collect().await?.to_bytes();
            return Ok(Upgrade::Refused(status, body));
        }
        let accept = resp
            .headers()
            .get("sec-websocket-accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if accept != derive_accept_key(key.as_bytes()) {
            bail!("the server's WebSocket handshake is wrong (Sec-WebSocket-Accept)");
        }
        let io = hyper::upgrade::on(resp)
            .await
            .context("the connection was not upgraded")?;
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        Ok(Upgrade::Open(Box::new(ws)))
    })
    .await
    .map_err(|_| anyhow!("no WebSocket within {} s", timeout.as_secs()))?
}
