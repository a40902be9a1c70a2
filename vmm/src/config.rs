//! The VM's configuration, validated before any KVM object exists.

use std::path::{Path, PathBuf};

use kiln_devices::rate_limiter::RateLimit;
use kiln_devices::virtio::block::device::MAX_QUEUES;
use kiln_devices::virtio::parse_mac;

use crate::loader::BzImageMode;
use crate::options::{self, Options};

/// Below this no Linux kernel gets far.
pub const MIN_MEMORY: u64 = 32 << 20;
/// APIC ids are 8 bits in the MADT entries kiln-vmm writes.
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("--memory {0:?}: expected a size such as 512M, 2G or 1024 (MiB)")]
    MemorySyntax(String),
    #[error("--memory {} MiB is too small: a guest needs at least {} MiB", .0 >> 20, MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory {} MiB is more than this host's {} MiB of RAM", .0 >> 20, .1 >> 20)]
    MemoryTooLarge(u64, u64),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {0} is more than kiln-vmm supports ({MAX_VCPUS})")]
    TooManyCpus(u32),
    #[error("--serial {0:?}: expected stdio, file:PATH, socket:PATH or none")]
    SerialSyntax(String),
    #[error(transparent)]
    Option(#[from] options::Error),
    #[error("two devices have the id {0:?}")]
    DuplicateId(String),
    #[error("--disk {disk}: queues={queues} is more than the VM's {vcpus} vCPUs (a disk has 1 queue per vCPU at most)")]
    TooManyQueues {
        disk: String,
        queues: u16,
        vcpus: u8,
    },
    #[error("{what} {}: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// Output to stdout, input from stdin (raw mode on a terminal).
    Stdio,
    /// Output to a file, no input.
    File(PathBuf),
    /// A Unix socket clients attach to: output to all of them (the last
    /// 64 KiB first), input from any.
    Socket(PathBuf),
    /// Discarded.
    None,
}

impl std::str::FromStr for SerialMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match (s.strip_prefix("file:"), s.strip_prefix("socket:")) {
                (Some(p), _) if !p.is_empty() => Ok(Self::File(p.into())),
                (_, Some(p)) if !p.is_empty() => Ok(Self::Socket(p.into())),
                _ => Err(Error::SerialSyntax(s.into())),
            },
        }
    }
}

/// What to do when the guest reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReboot {
    /// Exit with status 0 and say so.
    Exit,
    /// Start the VM again from scratch.
    Restart,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub backend: DiskBackend,
    pub id: Option<String>,
    pub rate_limit: RateLimit,
    /// Request queues (`queues=`, 1 to the VM's vCPU count; default 1).
    pub queues: u16,
}

/// Where a disk's requests are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    /// A raw image served by kiln-vmm's own virtio-blk device.
    File {
        path: PathBuf,
        read_only: bool,
        direct: bool,
    },
    /// A vhost-user-blk backend listening on this Unix socket: it serves the
    /// queues itself, in guest memory shared with it.
    VhostUser { socket: PathBuf },
    /// A kiln-store volume: the store daemon behind control socket `store`
    /// (None: kiln-store's default, `kiln_store::DEFAULT_SOCKET`)
    /// attaches it and serves it as a vhost-user-blk backend.
    Volume {
        name: String,
        store: Option<PathBuf>,
    },
}

impl DiskConfig {
    /// Is the disk served by another process, in shared guest memory?
    pub fn is_vhost_user(&self) -> bool {
        matches!(
            self.backend,
            DiskBackend::VhostUser { .. } | DiskBackend::Volume { .. }
        )
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = Error;
    /// `path=IMG[,ro=on][,direct=on][,id=NAME][,bw=BYTES][,ops=N][,queues=N]`,
    /// `vhost-user=SOCKET[,id=NAME][,queues=N]` or
    /// `volume=NAME[,store=SOCKET][,id=NAME][,queues=N]`
    fn from_str(s: &str) -> Result<Self, Error> {
        let o = Options::parse(
            "--disk",
            s,
            &[
                "path",
                "vhost-user",
                "volume",
                "store",
                "ro",
                "direct",
                "id",
                "bw",
                "ops",
                "queues",
            ],
        )?;
        let id = o.get("id").map(String::from);
        let rate_limit = rate_limit(&o)?;
        let queues = match o.get("queues") {
            None => 1,
            Some(v) => match v.parse::<u16>() {
                Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
                _ => {
                    return Err(o
                        .err(format!(
                            "queues={v:?} is not a queue count from 1 to {MAX_QUEUES}"
                        ))
                        .into())
                }
            },
        };
        if let Some(id) = &id {
            // virtio-blk serials are 20 bytes.
            if id.len() > 20 {
                return Err(o.err(format!("id {id:?} is longer than 20 bytes")).into());
            }
        }
        let given: Vec<&str> = ["path", "vhost-user", "volume"]
            .into_iter()
            .filter(|k| o.get(k).is_some())
            .collect();
        if given.len() != 1 {
            return Err(o
                .err("give exactly one of path=, vhost-user= and volume=".into())
                .into());
        }
        if o.get("store").is_some() && o.get("volume").is_none() {
            return Err(o.err("store= goes with volume=".into()).into());
        }
        if o.get("path").is_none() {
            for key in ["ro", "direct", "bw", "ops"] {
                if o.get(key).is_some() {
                    return Err(o
                        .err(format!(
                            "{key}= does not apply to a vhost-user disk (its backend decides)"
                        ))
                        .into());
                }
            }
        }
        let backend = if let Some(path) = o.get("path") {
            DiskBackend::File {
                path: path.into(),
                read_only: o.switch("ro")?,
                direct: o.switch("direct")?,
            }
        } else if let Some(socket) = o.get("vhost-user") {
            DiskBackend::VhostUser {
                socket: socket.into(),
            }
        } else {
            let name = o.required("volume")?;
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(o
                    .err(format!(
                        "volume name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                    ))
                    .into());
            }
            DiskBackend::Volume {
                name: name.to_string(),
                store: o.get("store").map(PathBuf::from),
            }
        };
        match &backend {
            DiskBackend::File { path, .. } => check_file("disk image", path)?,
            DiskBackend::VhostUser { socket } => check_socket("vhost-user socket", socket)?,
            DiskBackend::Volume {
                store: Some(store), ..
            } => check_socket("kiln-store socket", store)?,
            DiskBackend::Volume { store: None, .. } => {}
        }
        Ok(Self {
            backend,
            id,
            rate_limit,
            queues,
        })
    }
}

/// A virtio-net interface on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub id: Option<String>,
    pub rate_limit: RateLimit,
}

impl std::str::FromStr for NetConfig {
    type Err = Error;
    /// `tap=NAME[,mac=52:54:00:12:34:56][,id=NAME][,bw=BYTES][,ops=N]`
    fn from_str(s: &str) -> Result<Self, Error> {
        let o = Options::parse("--net", s, &["tap", "mac", "id", "bw", "ops"])?;
        let tap = o.required("tap")?;
        // IFNAMSIZ is 16 including the terminating NUL.
        if tap.len() > 15 || tap.contains('/') {
            return Err(o
                .err(format!("{tap:?} is not a valid interface name"))
                .into());
        }
        let mac = match o.get("mac") {
            Some(m) => Some(parse_mac(m).map_err(|e| o.err(e.to_string()))?),
            None => None,
        };
        Ok(Self {
            tap: tap.into(),
            mac,
            id: o.get("id").map(String::from),
            rate_limit: rate_limit(&o)?,
        })
    }
}

/// `bw=` (bytes per second, with an optional K/M/G binary suffix) and `ops=`
/// (requests or frames per second) of a device; neither means no limit.
fn rate_limit(o: &Options) -> Result<RateLimit, Error> {
    let positive = |key: &str, v: Option<u64>| match v {
        Some(0) => Err(o.err(format!(
            "{key}=0 would stop the device; leave {key} out for no limit"
        ))),
        v => Ok(v),
    };
    let bytes = match o.get("bw") {
        Some(v) => Some(parse_rate(v).ok_or_else(|| {
            o.err(format!(
                "bw={v:?} is not a rate in bytes per second (e.g. 50M)"
            ))
        })?),
        None => None,
    };
    let ops = match o.get("ops") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            o.err(format!(
                "ops={v:?} is not a whole number of operations per second"
            ))
        })?),
        None => None,
    };
    Ok(RateLimit {
        bytes_per_sec: positive("bw", bytes)?,
        ops_per_sec: positive("ops", ops)?,
    })
}

/// `1000`, `64K`, `50M`, `1G` (binary multiples) -> bytes.
fn parse_rate(s: &str) -> Option<u64> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// A disk has at most one queue per vCPU: the guest maps each CPU to one
/// queue, and more queues than CPUs only cost threads and memory.
pub fn check_disk_queues(disks: &[DiskConfig], vcpus: u8) -> Result<(), Error> {
    for d in disks {
        if d.queues > u16::from(vcpus) {
            let disk = match &d.backend {
                DiskBackend::File { path, .. } => format!("path={}", path.display()),
                DiskBackend::VhostUser { socket } => format!("vhost-user={}", socket.display()),
                DiskBackend::Volume { name, .. } => format!("volume={name}"),
            };
            return Err(Error::TooManyQueues {
                disk,
                queues: d.queues,
                vcpus,
            });
        }
    }
    Ok(())
}

/// Device ids must be unique across disks and interfaces.
pub fn check_unique_ids(disks: &[DiskConfig], nets: &[NetConfig]) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    let ids = disks.iter().filter_map(|d| d.id.as_ref());
    for id in ids.chain(nets.iter().filter_map(|n| n.id.as_ref())) {
        if !seen.insert(id) {
            return Err(Error::DuplicateId(id.clone()));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory: u64,
    pub serial: SerialMode,
    pub on_reboot: OnReboot,
    pub bzimage: BzImageMode,
    pub seccomp: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
}

/// Parses "512M", "2G", "1536MiB", "1024" (MiB) into bytes
/// (`kiln_units::parse_size`).
pub fn parse_memory(s: &str) -> Result<u64, Error> {
    kiln_units::parse_size(s, kiln_units::Bare::MiB).map_err(|_| Error::MemorySyntax(s.into()))
}

/// The host's RAM, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

pub fn check_memory(bytes: u64, host: Option<u64>) -> Result<u64, Error> {
    if bytes < MIN_MEMORY {
        return Err(Error::MemoryTooSmall(bytes));
    }
    match host {
        Some(h) if bytes > h => Err(Error::MemoryTooLarge(bytes, h)),
        _ => Ok(bytes),
    }
}

pub fn check_vcpus(n: u32) -> Result<u8, Error> {
    match n {
        0 => Err(Error::NoCpus),
        n if n > u32::from(MAX_VCPUS) => Err(Error::TooManyCpus(n)),
        n => Ok(n as u8),
    }
}

/// The file must be a readable regular file.
pub fn check_file(what: &'static str, path: &Path) -> Result<(), Error> {
    let bad = |reason: String| Error::BadFile {
        what,
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| bad(e.to_string()))
}

/// The path must be a Unix socket (whether anything listens on it is found
/// out when kiln-vmm connects).
pub fn check_socket(what: &'static str, path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::BadFile {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if !meta.file_type().is_socket() {
        return Err(Error::BadFile {
            what,
            path: path.to_owned(),
            reason: "not a Unix socket".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("512"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("1536MiB"), Ok(1536 << 20));
        assert_eq!(parse_memory("65536k"), Ok(64 << 20));
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_limits() {
        assert_eq!(
            check_memory(16 << 20, None),
            Err(Error::MemoryTooSmall(16 << 20))
        );
        assert_eq!(
            check_memory(8 << 30, Some(4 << 30)),
            Err(Error::MemoryTooLarge(8 << 30, 4 << 30))
        );
        assert_eq!(check_memory(256 << 20, Some(4 << 30)), Ok(256 << 20));
    }

    #[test]
    fn vcpu_limits() {
        assert_eq!(check_vcpus(0), Err(Error::NoCpus));
        assert_eq!(check_vcpus(255), Err(Error::TooManyCpus(255)));
        assert_eq!(check_vcpus(2), Ok(2));
    }

    #[test]
    fn rate_limit_options() {
        let n: NetConfig = "tap=t0,bw=50M,ops=1000".parse().unwrap();
        assert_eq!(
            n.rate_limit,
            RateLimit {
                bytes_per_sec: Some(50 << 20),
                ops_per_sec: Some(1000)
            }
        );
        let n: NetConfig = "tap=t0,bw=4096".parse().unwrap();
        assert_eq!(n.rate_limit.bytes_per_sec, Some(4096));
        assert_eq!(n.rate_limit.ops_per_sec, None);
        assert!("tap=t0"
            .parse::<NetConfig>()
            .unwrap()
            .rate_limit
            .is_unlimited());
        for bad in ["bw=0", "ops=0", "bw=fast", "bw=10T", "ops=1.5", "bw=-1"] {
            let e = format!("tap=t0,{bad}").parse::<NetConfig>().unwrap_err();
            assert!(
                e.to_string().contains(bad.split('=').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn disk_and_net_options() {
        let img = std::env::temp_dir().join(format!("kiln-cfg-disk-{}", std::process::id()));
        std::fs::write(&img, [0u8; 512]).unwrap();
        let d: DiskConfig = format!("path={},ro=on,id=data", img.display())
            .parse()
            .unwrap();
        assert_eq!(
            d.backend,
            DiskBackend::File {
                path: img.clone(),
                read_only: true,
                direct: false
            }
        );
        assert_eq!(d.id.as_deref(), Some("data"));
        assert_eq!(d.queues, 1, "one queue unless asked");
        assert!("path=/nonexistent.img".parse::<DiskConfig>().is_err());
        let q: DiskConfig = format!("path={},queues=4", img.display()).parse().unwrap();
        assert_eq!(q.queues, 4);
        for bad in ["0", "65", "two", "-1"] {
            let e = format!("path={},queues={bad}", img.display())
                .parse::<DiskConfig>()
                .unwrap_err()
                .to_string();
            assert!(e.contains("queue count from 1 to 64"), "{e}");
        }
        assert_eq!(check_disk_queues(std::slice::from_ref(&q), 4), Ok(()));
        let e = check_disk_queues(&[d.clone(), q], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("queues=4 is more than the VM's 2 vCPUs"), "{e}");
        assert!(e.contains(&img.display().to_string()), "{e}");
        assert!(
            format!("path={},id=abcdefghijklmnopqrstuvwxyz", img.display())
                .parse::<DiskConfig>()
                .is_err()
        );

        let n: NetConfig = "tap=kt0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!("tap=kt0,mac=52:54:00:12:34".parse::<NetConfig>().is_err());
        assert!("tap=a-very-long-interface-name"
            .parse::<NetConfig>()
            .is_err());

        let n2: NetConfig = "tap=kt1,id=data".parse().unwrap();
        assert_eq!(
            check_unique_ids(&[d], &[n2]),
            Err(Error::DuplicateId("data".into()))
        );
        std::fs::remove_file(img).unwrap();
    }

    #[test]
    fn vhost_user_disk_options() {
        let dir = std::env::temp_dir().join(format!("kiln-cfg-vu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("blk.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let img = dir.join("plain.img");
        std::fs::write(&img, [0u8; 512]).unwrap();

        let d: DiskConfig = format!("vhost-user={},id=vol0", sock.display())
            .parse()
            .unwrap();
        assert!(d.is_vhost_user());
        assert_eq!(
            d.backend,
            DiskBackend::VhostUser {
                socket: sock.clone()
            }
        );
        assert_eq!(d.id.as_deref(), Some("vol0"));
        let q: DiskConfig = format!("vhost-user={},queues=2", sock.display())
            .parse()
            .unwrap();
        assert_eq!(q.queues, 2);
        let e = check_disk_queues(&[q], 1).unwrap_err().to_string();
        assert!(e.contains("vhost-user="), "{e}");

        let err = |s: String| s.parse::<DiskConfig>().unwrap_err().to_string();
        let s = sock.display();
        assert!(err(format!("vhost-user={s},ro=on")).contains("ro= does not apply"));
        assert!(err(format!("vhost-user={s},direct=off")).contains("direct= does not apply"));
        assert!(err(format!("vhost-user={s},path={}", img.display())).contains("exactly one"));
        assert!(err("id=x".into()).contains("exactly one of path="));
        assert!(err(format!("vhost-user={}", img.display())).contains("not a Unix socket"));
        let missing = dir.join("missing.sock");
        assert!(err(format!("vhost-user={}", missing.display())).contains("No such file"));

        // A kiln-store volume: the store's control socket is checked here.
        let d: DiskConfig = format!("volume=vm-1.root,store={s},id=root")
            .parse()
            .unwrap();
        assert!(d.is_vhost_user());
        assert_eq!(
            d.backend,
            DiskBackend::Volume {
                name: "vm-1.root".into(),
                store: Some(sock.clone())
            }
        );
        assert!(err(format!("volume=a/b,store={s}")).contains("volume name"));
        assert!(err(format!("volume=v,store={s},ro=on")).contains("ro= does not apply"));
        assert!(err(format!("vhost-user={s},store={s}")).contains("store= goes with volume="));
        assert!(err(format!("volume=v,store={}", missing.display())).contains("kiln-store socket"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn serial_modes() {
        assert_eq!("stdio".parse(), Ok(SerialMode::Stdio));
        assert_eq!("none".parse(), Ok(SerialMode::None));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialMode::File("/tmp/x".into())));
        assert!("file:".parse::<SerialMode>().is_err());
        assert_eq!(
            "socket:/run/c.sock".parse(),
            Ok(SerialMode::Socket("/run/c.sock".into()))
        );
        assert!("socket:".parse::<SerialMode>().is_err());
        assert!("tcp:1".parse::<SerialMode>().is_err());
    }
}
