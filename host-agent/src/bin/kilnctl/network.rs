//! `kilnctl network`: bridges.

use anyhow::Result;
use clap::Subcommand;
use hyper::Method;
use serde_json::json;

use crate::ctl::Ctl;

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create a network: a bridge (default name kb-NAME).
    Create {
        name: String,
        #[arg(long)]
        bridge: Option<String>,
        /// An interface to connect the bridge to.
        #[arg(long)]
        uplink: Option<String>,
        /// A VLAN id on the uplink.
        #[arg(long, requires = "uplink")]
        vlan: Option<u16>,
        /// The node's address on the network, e.g. 10.7.0.1/24.
        #[arg(long)]
        address: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

pub const NET_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("STATE", "status.state"),
    ("BRIDGE", "status.bridge"),
    ("ADDRESS", "spec.address"),
    ("ID", "id"),
];

pub async fn run(ctl: &Ctl, c: NetworkCmd) -> Result<()> {
    match c {
        NetworkCmd::Create {
            name,
            bridge,
            uplink,
            vlan,
            address,
        } => {
            let v = ctl.req(Method::POST, "/v1/networks", Some(json!({"name": name, "spec": {"bridge": bridge, "uplink": uplink, "vlan": vlan, "address": address}}))).await?;
            ctl.print(&v, NET_COLS);
        }
        NetworkCmd::List => ctl.print(&ctl.req(Method::GET, "/v1/networks", None).await?, NET_COLS),
        NetworkCmd::Show { name } => ctl.print(
            &ctl.req(Method::GET, &format!("/v1/networks/{name}"), None)
                .await?,
            NET_COLS,
        ),
        NetworkCmd::Delete { name } => ctl.print(
            &ctl.req(Method::DELETE, &format!("/v1/networks/{name}"), None)
                .await?,
            NET_COLS,
        ),
    }
    Ok(())
}
