//! `kilnctl image import --upload`: an image's files sent over the API (the
//! way in from another machine), with a progress bar; a failed upload
//! removes the image it made.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::Method;
use kiln_agent::client::send_body;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::ctl::{failure, Ctl};

/// Creates image `name` with an upload source and sends `files` (role,
/// path) one after the other.
pub async fn upload(
    ctl: &Ctl,
    name: &str,
    files: &[(&str, PathBuf)],
    cmdline: Option<String>,
) -> Result<Value> {
    let mut declared = Vec::new();
    for (role, path) in files {
        let m =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !m.is_file() {
            anyhow::bail!("{} is not a regular file", path.display());
        }
        declared.push(json!({"role": role, "size": m.len()}));
    }
    let source = json!({"kind": "upload", "files": declared, "cmdline": cmdline});
    ctl.req(
        Method::POST,
        "/v1/images",
        Some(json!({"name": name, "spec": {"source": source}})),
    )
    .await?;
    let total: u64 = declared.iter().filter_map(|d| d["size"].as_u64()).sum();
    let bar = if ctl.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("uploading {name}"));
    let mut last = Value::Null;
    for (role, path) in files {
        match send_file(ctl, name, role, path, &bar).await {
            Ok(v) => last = v,
            Err(e) => {
                bar.abandon();
                // Nothing half-made: the image goes with the failed upload.
                let _ = ctl
                    .req(Method::DELETE, &format!("/v1/images/{name}"), None)
                    .await;
                return Err(e.context(format!("upload of image {name} failed; removed it")));
            }
        }
    }
    bar.finish_and_clear();
    Ok(last)
}

async fn send_file(
    ctl: &Ctl,
    name: &str,
    role: &str,
    path: &PathBuf,
    bar: &indicatif::ProgressBar,
) -> Result<Value> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let progress = bar.clone();
    let chunks = futures_util::stream::unfold(Some(file), move |state| {
        let progress = progress.clone();
        async move {
            let mut f = state?;
            let mut buf = vec![0u8; 256 << 10];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    progress.inc(n as u64);
                    Some((Ok(Frame::data(Bytes::from(buf))), Some(f)))
                }
                // Ends the stream after the error.
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    let resp = send_body(
        &ctl.ep,
        Method::PUT,
        &format!("/v1/images/{name}/files/{role}"),
        &ctl.headers(),
        Some("application/octet-stream"),
        StreamBody::new(chunks).boxed(),
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("cannot send {}", path.display()))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(failure(status, &bytes).into());
    }
    serde_json::from_slice(&bytes).context("the agent's answer is not JSON")
}
