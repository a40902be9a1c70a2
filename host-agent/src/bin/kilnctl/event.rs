//! `kilnctl event`: the event log, listed or watched.

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use crate::ctl::{field, stream_body, Ctl};

#[derive(Subcommand)]
pub enum EventCmd {
    /// Events after --since.
    List {
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Print events as they happen (after --since, if given).
    Watch {
        #[arg(long)]
        since: Option<u64>,
    },
}

pub const EVENT_COLS: &[(&str, &str)] = &[
    ("SEQ", "seq"),
    ("TIME", "time"),
    ("KIND", "kind"),
    ("NAME", "name"),
    ("ACTION", "action"),
    ("STATE", "state"),
    ("MESSAGE", "message"),
];

pub async fn run(ctl: &Ctl, c: EventCmd) -> Result<()> {
    let j = ctl.json;
    match c {
        EventCmd::List { since } => ctl.print(
            &ctl.req(Method::GET, &format!("/v1/events?since={since}"), None)
                .await?,
            EVENT_COLS,
        ),
        EventCmd::Watch { since } => {
            let path = match since {
                Some(s) => format!("/v1/events/stream?since={s}"),
                None => "/v1/events/stream".into(),
            };
            let resp = ctl.stream(&path).await?;
            let mut pending = String::new();
            stream_body(resp, |chunk| {
                pending.push_str(&String::from_utf8_lossy(chunk));
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    if let Some(data) = line.trim_end().strip_prefix("data:") {
                        let e: Value = serde_json::from_str(data.trim())?;
                        if j {
                            println!("{}", serde_json::to_string(&e)?);
                        } else {
                            println!(
                                "{:>6} {} {} {} {} {} {}",
                                field(&e, "seq"),
                                field(&e, "time"),
                                field(&e, "kind"),
                                field(&e, "name"),
                                field(&e, "action"),
                                field(&e, "state"),
                                field(&e, "message")
                            );
                        }
                        std::io::stdout().flush()?;
                    }
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}
