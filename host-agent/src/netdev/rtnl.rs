//! The few rtnetlink requests the agent makes, on one connection per
//! operation. Errors carry the kernel's errno; callers add which interface
//! and what for.

use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVlan};
use tokio::task::JoinHandle;

/// A netlink connection whose reader task ends when this is dropped.
pub(super) struct Rtnl {
    handle: Handle,
    conn: JoinHandle<()>,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The kernel's refusal as an `io::Error` ("File exists (os error 17)"),
/// anything else as it is.
fn os(e: rtnetlink::Error) -> anyhow::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().into(),
        e => e.into(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

impl Rtnl {
    pub(super) fn open() -> Result<Rtnl> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        Ok(Rtnl {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// The index of interface `name`, if there is one.
    pub(super) async fn index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = pin!(self.handle.link().get().match_name(name).execute());
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(os(e)).with_context(|| format!("cannot look up interface {name}")),
        }
    }

    /// A new bridge, down.
    pub(super) async fn add_bridge(&self, name: &str) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        self.handle.link().add(msg).execute().await.map_err(os)
    }

    /// A new VLAN interface on `parent`, made a port of `master` and up in
    /// the same request: the kernel removes it again if enslaving fails.
    pub(super) async fn add_vlan_port(
        &self,
        name: &str,
        parent: u32,
        id: u16,
        master: u32,
    ) -> Result<()> {
        let msg = LinkVlan::new(name, parent, id)
            .controller(master)
            .up()
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            let vlan_module = std::path::Path::new("/proc/net/vlan").exists();
            match errno(&e) {
                Some(libc::EOPNOTSUPP) if !vlan_module => {
                    os(e).context("this kernel has no VLAN support (8021q)")
                }
                _ => os(e),
            }
        })
    }

    pub(super) async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(os)
    }

    /// `ip link set <index> master <master> up`.
    pub(super) async fn enslave_up(&self, index: u32, master: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(master)
            .up()
            .build();
        self.handle.link().change(msg).execute().await.map_err(os)
    }

    pub(super) async fn up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle.link().change(msg).execute().await.map_err(os)
    }

    /// Deletes interface `name` if it exists.
    pub(super) async fn delete(&self, name: &str) -> Result<()> {
        let Some(index) = self.index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            r => r.map_err(os),
        }
    }
}
