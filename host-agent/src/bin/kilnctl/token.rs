//! `kilnctl token`: API tokens.

use anyhow::Result;
use clap::Subcommand;
use hyper::Method;
use serde_json::json;

use crate::ctl::Ctl;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token; its value is printed once.
    Create {
        name: String,
        #[arg(long, default_value = "admin", value_parser = ["admin", "reader"])]
        role: String,
    },
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        name: String,
    },
}

pub const TOKEN_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("ROLE", "spec.role"),
    ("CREATED", "created_at"),
    ("ID", "id"),
];

pub async fn run(ctl: &Ctl, c: TokenCmd) -> Result<()> {
    let j = ctl.json;
    match c {
        TokenCmd::Create { name, role } => {
            let v = ctl
                .req(
                    Method::POST,
                    "/v1/tokens",
                    Some(json!({"name": name, "spec": {"role": role}})),
                )
                .await?;
            if j {
                ctl.print(&v, &[])
            } else {
                eprintln!("token {name} ({role}); its value is shown only now:");
                println!("{}", v["token"].as_str().unwrap_or(""));
            }
        }
        TokenCmd::List => ctl.print(&ctl.req(Method::GET, "/v1/tokens", None).await?, TOKEN_COLS),
        TokenCmd::Revoke { name } => ctl.print(
            &ctl.req(Method::DELETE, &format!("/v1/tokens/{name}"), None)
                .await?,
            TOKEN_COLS,
        ),
    }
    Ok(())
}
