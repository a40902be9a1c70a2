//! The agent's two listeners: the root-only unix socket (trusted: the
//! caller's uid is checked to be root or the agent's own) and TCP with TLS
//! (every request needs a bearer token).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};

/// How long a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_conn<S>(io: S, app: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(app);
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

/// Binds the unix socket, replacing a stale one (the state database's
/// lock already proved that no other agent runs on this data directory).
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve_unix(l: UnixListener, app: Router) {
    // SAFETY: geteuid(2) cannot fail and has no memory effects.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let allowed = s
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == me)
            .unwrap_or(false);
        if !allowed {
            tracing::warn!(
                "refused a unix-socket client that is neither root nor the agent's user"
            );
            continue;
        }
        tokio::spawn(serve_conn(s, app.clone()));
    }
}

pub async fn serve_tls(l: TcpListener, tls: rustls::ServerConfig, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((tcp, peer)) = l.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => serve_conn(tls, app).await,
                Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
            }
        });
    }
}
