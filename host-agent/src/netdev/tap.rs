//! Persistent TAP devices, made through `/dev/net/tun`: the kernel does not
//! create tun devices over rtnetlink.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

/// `IFNAMSIZ`, the terminating NUL included.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes the persistent TAP `name` (which must not exist), down and on no
/// bridge: `IFF_TAP | IFF_NO_PI`, one queue, no virtio-net header, as
/// `ip tuntap add mode tap` does. kiln-vmm later attaches to it with
/// `IFF_VNET_HDR`, which each attaching file sets for itself.
pub(super) fn create_persistent(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        bail!("bad TAP name {name:?}");
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun (is the tun module loaded?)")?;
    let mut req = IfReqFlags {
        name: [0; IFNAMSIZ],
        // IFF_TUN_EXCL: fail rather than attach to an interface that appeared
        // in the meantime; the kernel does not keep it in the TAP's flags.
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its
    // size and layout and outlives the call; `tun` is an open fd we own.
    let ret = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut IfReqFlags,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("TUNSETIFF failed");
    }
    let persist: libc::c_ulong = 1;
    // SAFETY: TUNSETPERSIST takes its argument by value and touches no
    // memory of ours; `tun` is attached to the new TAP.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, persist) };
    if ret < 0 {
        // Closing `tun` removes the TAP, which is not persistent yet.
        return Err(io::Error::last_os_error()).context("TUNSETPERSIST failed");
    }
    Ok(())
}
