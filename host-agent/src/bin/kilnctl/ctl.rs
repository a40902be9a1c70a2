//! The agent client behind every command: requests, errors with exit
//! statuses, tables, waiting on a state.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use kiln_agent::client::{call, Endpoint};
use serde_json::Value;

/// An error with the exit status it should give.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Failure {}

/// The agent's refusal (its JSON error body) with the exit status it gives.
pub fn failure(status: StatusCode, body: &[u8]) -> Failure {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{status}"));
    let code = match status {
        StatusCode::NOT_FOUND => 3,
        StatusCode::CONFLICT | StatusCode::PRECONDITION_REQUIRED => 4,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => 5,
        _ => 1,
    };
    Failure { code, message }
}

pub struct Ctl {
    pub ep: Endpoint,
    pub token: Option<String>,
    pub json: bool,
}

impl Ctl {
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        self.token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect()
    }

    pub async fn req(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let (status, bytes) = call(
            &self.ep,
            method,
            path,
            &self.headers(),
            body,
            Duration::from_secs(60),
        )
        .await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).context("the agent's answer is not JSON");
        }
        Err(failure(status, &bytes).into())
    }

    /// A GET whose answer is a stream (console output, events): the
    /// response to read on, or the agent's refusal as a [`Failure`].
    pub async fn stream(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>> {
        let resp = kiln_agent::client::send(
            &self.ep,
            Method::GET,
            path,
            &self.headers(),
            None,
            Duration::from_secs(10),
        )
        .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(failure(status, &bytes).into());
        }
        Ok(resp)
    }

    pub fn print(&self, v: &Value, columns: &[(&str, &str)]) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        let rows: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        let mut t = Table::new();
        t.load_preset(UTF8_BORDERS_ONLY);
        t.set_header(columns.iter().map(|(h, _)| h.to_string()));
        for r in rows {
            t.add_row(columns.iter().map(|(_, p)| field(r, p)));
        }
        println!("{t}");
    }

    /// Polls a resource until its state is one of `want`; fails on `failed`.
    pub async fn wait(&self, path: &str, want: &[&str], timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.req(Method::GET, path, None).await?;
            let state = v["status"]["state"].as_str().unwrap_or("");
            if want.contains(&state) {
                return Ok(v);
            }
            if state == "failed" {
                let reason = v["status"]["reason"].as_str().unwrap_or("no reason given");
                bail!("{} failed: {reason}", v["name"].as_str().unwrap_or(path));
            }
            if start.elapsed() > timeout {
                bail!("still {state} after {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A dotted path into JSON, as text.
pub fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

pub async fn stream_body(
    resp: hyper::Response<hyper::body::Incoming>,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            f(&data)?;
        }
    }
    Ok(())
}
