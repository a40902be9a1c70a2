//! A TAP interface opened through `/dev/net/tun`.
//!
//! Kiln attaches to an interface that already exists (created and plugged
//! into a bridge by the host's network setup); it never creates one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use tracing::debug;

use super::FrameIo;
use crate::virtio::metrics::NetCounters;

/// Length of `struct virtio_net_hdr_v1`, prepended to every frame.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";
/// `IFNAMSIZ` including the terminating NUL.
const IFNAMSIZ: usize = 16;
const IFF_TUN: u32 = 0x0001;
const IFF_MULTI_QUEUE: u32 = 0x0100;

/// Errors opening a TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid interface name {0:?} (1 to 15 characters, no '/', ':', whitespace)")]
    InvalidName(String),
    #[error(
        "network interface {0} does not exist (create it with `ip tuntap add name {0} mode tap`)"
    )]
    NoSuchDevice(String),
    #[error("network interface {0} is not a TAP interface")]
    NotATap(String),
    #[error("{TUN_PATH} does not exist (is the tun module loaded?)")]
    NoTunDevice,
    #[error("permission denied attaching to TAP interface {0} (needs CAP_NET_ADMIN or the interface's owner)")]
    PermissionDenied(String),
    #[error("TAP interface {0} is already in use by another process")]
    Busy(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to TAP interface {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the virtio-net header size on {name}: {source}")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP queue carrying frames with a virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    counters: Arc<NetCounters>,
}

impl Tap {
    /// Attaches to the existing TAP interface `name`, non-blocking, with
    /// `IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio-net header.
    pub fn open(name: &str) -> Result<Self, TapError> {
        validate_name(name)?;
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::NoSuchDevice(name.into()));
        }
        let tun_flags = std::fs::read_to_string(sys.join("tun_flags"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| TapError::NotATap(name.into()))?;
        if tun_flags & IFF_TUN != 0 {
            return Err(TapError::NotATap(name.into()));
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                io::ErrorKind::PermissionDenied => TapError::PermissionDenied(name.into()),
                _ => TapError::OpenTun(e),
            })?;

        let mut flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        // The attach flags must match how the interface was created.
        flags |= tun_flags & IFF_MULTI_QUEUE;
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its
        // size and layout and lives across the call; the fd is ours.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut IfReqFlags,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name.into()),
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                _ => TapError::Attach {
                    name: name.into(),
                    source: e,
                },
            });
        }

        let tap = Self {
            file,
            name: name.into(),
            counters: Arc::default(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        let ret = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(TapError::VnetHdr {
                name: tap.name,
                source: io::Error::last_os_error(),
            });
        }
        debug!(tap = name, "attached to TAP interface");
        Ok(tap)
    }

    /// Frames through the interface, for the control API.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the guest can take (`TUN_F_*`): it
    /// then hands us partially checksummed and GSO frames.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed to the kernel.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.into()))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&self.file).read(buf)?;
        self.counters
            .received(n.saturating_sub(VNET_HDR_LEN) as u64);
        Ok(n)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        let n = (&self.file).write(buf)?;
        self.counters.sent(n.saturating_sub(VNET_HDR_LEN) as u64);
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// A TAP interface created for one test and deleted afterwards.
    pub(crate) struct TestTap(pub String);

    impl TestTap {
        /// Creates `name`, or skips the test (`kiln_tests::skip`: a panic
        /// under CI=true) and returns None when this machine cannot.
        pub(crate) fn create(name: &str) -> Option<Self> {
            let _ = Command::new("ip").args(["link", "del", name]).output();
            match Command::new("ip")
                .args(["tuntap", "add", "name", name, "mode", "tap"])
                .output()
            {
                Ok(o) if o.status.success() => Some(Self(name.into())),
                Ok(o) => {
                    kiln_tests::skip(format!(
                        "cannot create TAP {name}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    None
                }
                Err(e) => {
                    kiln_tests::skip(format!("cannot run ip: {e}"));
                    None
                }
            }
        }
    }

    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            "a/b",
            "x:0",
            "sixteen-chars-xx",
            "has space",
            "..",
            "tab\t",
        ] {
            assert!(
                matches!(Tap::open(n), Err(TapError::InvalidName(_))),
                "{n:?}"
            );
        }
    }

    #[test]
    fn missing_and_non_tap_interfaces_are_reported() {
        let e = Tap::open("kiln-nonexist0").unwrap_err();
        assert!(matches!(e, TapError::NoSuchDevice(_)));
        assert!(e.to_string().contains("kiln-nonexist0"));
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap(_))));
    }

    #[test]
    fn attaches_and_sets_offloads() {
        let Some(t) = TestTap::create("kt0") else {
            return;
        };
        let tap = Tap::open(&t.0).unwrap();
        assert_eq!(tap.name(), "kt0");
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // Nothing to read yet: non-blocking.
        let mut buf = [0u8; 64];
        let e = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // A second attach to a single-queue TAP is refused.
        assert!(matches!(Tap::open(&t.0), Err(TapError::Busy(_))));
    }
}
