//! `kilnctl vm console`: print a VM's console output, follow it, or attach
//! to it (a WebSocket to the agent): what is typed goes to the guest,
//! Ctrl-] detaches and the VM keeps running.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use kiln_agent::client::{websocket, Upgrade, WebSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::ctl::{failure, stream_body, Ctl};

/// Ctrl-]: the byte that detaches.
pub const DETACH: u8 = 0x1d;

/// How long the closing handshake may take after detaching.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Attaches when asked to, or when stdin and stdout are a terminal (and
/// not --follow); otherwise prints the recent output (and follows it).
pub async fn run(ctl: &Ctl, name: &str, follow: bool, attach: bool) -> Result<()> {
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if attach || (terminal && !follow) {
        attach_to(ctl, name, std::io::stdin().is_terminal()).await
    } else {
        print_output(ctl, name, follow).await
    }
}

async fn print_output(ctl: &Ctl, name: &str, follow: bool) -> Result<()> {
    let path = format!("/v1/vms/{name}/console?follow={follow}");
    let resp = ctl.stream(&path).await?;
    let mut out = std::io::stdout();
    stream_body(resp, |chunk| {
        out.write_all(chunk)?;
        out.flush()?;
        Ok(())
    })
    .await
}

/// How an attachment ended.
enum End {
    /// Ctrl-], the end of input, or a signal.
    Detached,
    /// The agent closed the console, saying why.
    Closed(String),
}

async fn attach_to(ctl: &Ctl, name: &str, raw: bool) -> Result<()> {
    let path = format!("/v1/vms/{name}/console/attach");
    let ws = match websocket(&ctl.ep, &path, &ctl.headers(), Duration::from_secs(10)).await? {
        Upgrade::Open(ws) => *ws,
        Upgrade::Refused(status, body) => return Err(failure(status, &body).into()),
    };
    let input = stdin_chunks();
    let end = if raw {
        eprintln!("attached to {name}; detach with Ctrl-]");
        let guard = RawMode::enable()?;
        let end = relay(ws, input).await;
        drop(guard);
        eprintln!();
        end
    } else {
        relay(ws, input).await
    }?;
    match end {
        End::Detached if raw => eprintln!("detached from {name}"),
        End::Detached => {}
        End::Closed(why) => eprintln!("kilnctl: the console of {name} closed: {why}"),
    }
    Ok(())
}

/// Copies the agent's messages to stdout and stdin to the agent until a
/// detach byte, the end of stdin, a signal, or the agent closing.
async fn relay(ws: WebSocket, mut input: mpsc::Receiver<Vec<u8>>) -> Result<End> {
    let (mut tx, mut rx) = ws.split();
    let mut out = std::io::stdout();
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite has queued the answer; send it.
                    let _ = tokio::time::timeout(CLOSE_GRACE, tx.close()).await;
                    let why = frame
                        .map(|f| f.reason.as_str().to_string())
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "closed by the agent".into());
                    return Ok(End::Closed(why));
                }
                Some(Ok(m)) => write_out(&mut out, m)?,
                Some(Err(e)) => return Err(e).context("the console connection failed"),
                None => return Ok(End::Closed("the connection ended".into())),
            },
            chunk = input.recv() => match chunk {
                Some(bytes) => {
                    let cut = bytes.iter().position(|&b| b == DETACH);
                    let send = &bytes[..cut.unwrap_or(bytes.len())];
                    if !send.is_empty() {
                        tx.send(Message::Binary(send.to_vec().into()))
                            .await
                            .context("cannot send to the console")?;
                    }
                    if cut.is_some() {
                        break;
                    }
                }
                None => break,
            },
            _ = term.recv() => break,
            _ = hup.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Detach: close, printing what still arrives until the agent's close.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let bye = CloseFrame {
            code: CloseCode::Normal,
            reason: "detached".into(),
        };
        tx.send(Message::Close(Some(bye))).await?;
        while let Some(m) = rx.next().await {
            write_out(&mut out, m?)?;
        }
        anyhow::Ok(())
    })
    .await;
    Ok(End::Detached)
}

fn write_out(out: &mut std::io::Stdout, m: Message) -> Result<()> {
    let bytes = match m {
        Message::Binary(b) => b,
        Message::Text(t) => t.into(),
        _ => return Ok(()),
    };
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(())
}

/// Stdin in chunks, read by a thread of its own: a blocking read that
/// never returns must not keep the process from exiting.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// The terminal in raw mode (keys go to the guest as typed, Ctrl-C
/// included) until this is dropped. A panic restores it too, also where it
/// aborts (release builds) and no drop runs.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = crossterm::terminal::disable_raw_mode();
            previous(info);
        }));
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
