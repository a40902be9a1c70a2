//! The agent's side of kiln-vmm's control API (`--api-socket`).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper::Method;
use serde::Deserialize;

use crate::client::{call, Endpoint};

/// What `GET /vm` says (fields the agent uses; the rest is kept as JSON).
#[derive(Deserialize, Debug, Clone)]
pub struct VmInfo {
    pub state: String,
    #[serde(default)]
    pub uptime_ms: u64,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub vcpu_time_ns: u64,
    #[serde(default)]
    pub devices: Vec<serde_json::Value>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn info(api: &Path) -> Result<VmInfo> {
    let (status, body) = call(
        &Endpoint::Unix(api.to_path_buf()),
        Method::GET,
        "/vm",
        &[],
        None,
        TIMEOUT,
    )
    .await?;
    if !status.is_success() {
        bail!(
            "kiln-vmm answered GET /vm with {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("kiln-vmm's GET /vm is not the expected JSON")
}

/// `PUT /vm/<action>`: shutdown, power-off, pause, resume, reboot.
pub async fn action(api: &Path, action: &str) -> Result<()> {
    let (status, body) = call(
        &Endpoint::Unix(api.to_path_buf()),
        Method::PUT,
        &format!("/vm/{action}"),
        &[],
        None,
        TIMEOUT,
    )
    .await
    .with_context(|| format!("kiln-vmm did not take {action}"))?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("kiln-vmm refused {action} ({status}): {msg}");
    }
    Ok(())
}
