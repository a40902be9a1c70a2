//! The frontend against a real vhost-user-blk backend, qemu-storage-daemon
//! (Debian's qemu-system-common), without a guest: the test plays the
//! driver through the virtio-mmio registers and puts requests in the ring
//! itself; the daemon serves them in the shared memory.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::{Error, VhostUserBlock, VhostUserBlockConfig};
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;

mod config_change;
mod dirty_log;
mod features;
mod snapshot;

const DISK_SECTORS: u64 = 16 << 11; // 16 MiB
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x6000;

/// A qemu-storage-daemon exporting a raw image over vhost-user-blk; killed
/// on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    fn start() -> Self {
        Self::start_with(1)
    }

    /// A daemon whose export has `queues` queues (`num-queues=`).
    fn start_with(queues: u16) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/kiln-vublk-").unwrap();
        let image = dir.as_path().join("disk.img");
        let socket = dir.as_path().join("vhost.sock");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(DISK_SECTORS * 512)
            .unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed (scripts/install-deps: qemu-system-common)");
        let mut d = Self {
            child,
            socket,
            image,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited");
            assert!(Instant::now() < deadline, "the daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Guest memory backed by a shared file, as kiln-vmm's memfd is.
fn shared_mem() -> GuestMemoryMmap {
    let f = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/kiln-vublk-ram")
        .unwrap()
        .into_file();
    f.set_len(1 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        1 << 20,
        Some(FileOffset::new(f, 0)),
    )])
    .unwrap()
}

fn r32(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn features(t: &mut MmioTransport) -> u64 {
    w32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = r32(t, VIRTIO_MMIO_DEVICE_FEATURES);
    w32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    (u64::from(r32(t, VIRTIO_MMIO_DEVICE_FEATURES)) << 32) | u64::from(low)
}

/// Probes the device as a driver would: VERSION_1 and FLUSH, one queue of
/// QSIZE entries at DESC/AVAIL/USED, then DRIVER_OK.
fn bring_up(t: &mut MmioTransport, mem: &GuestMemoryMmap) {
    // A fresh ring.
    mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    w32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
    for page in 0..2u32 {
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
        w32(
            t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (acked >> (32 * page)) as u32,
        );
    }
    let features_ok =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    w32(t, VIRTIO_MMIO_STATUS, features_ok);
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
    w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w32(
        t,
        VIRTIO_MMIO_STATUS,
        features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// Puts one virtio-blk request (header, data, status) in the ring as entry
/// `n` (0-based since bring-up), kicks the queue and waits for the backend's
/// interrupt and used entry. Returns the status byte.
fn request(
    mem: &GuestMemoryMmap,
    kick: &EventFd,
    irq: &EventFd,
    n: u16,
    t: u32,
    sector: u64,
    len: u32,
) -> u8 {
    mem.write_obj(t, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let data_flags = if t == VIRTIO_BLK_T_IN {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    let chain = [
        (HDR, 16u32, VRING_DESC_F_NEXT),
        (DATA, len, data_flags | VRING_DESC_F_NEXT),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ];
    for (i, (addr, len, flags)) in chain.iter().enumerate() {
        let d = DESC + 16 * i as u64;
        mem.write_obj(*addr, GuestAddress(d)).unwrap();
        mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(*flags as u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
    }
    let slot = u64::from(n % QSIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if used == n + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no used entry for request {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The backend signalled the irqfd itself.
    assert!(irq.read().unwrap() >= 1);
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn image_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn negotiates_with_qemu_storage_daemon_and_serves_io_through_shared_memory() {
    let mut daemon = Daemon::start();
    let dev = VhostUserBlock::connect(VhostUserBlockConfig {
        socket: daemon.socket.clone(),
        queues: 1,
    })
    .unwrap();
    assert_eq!(dev.capacity_sectors(), DISK_SECTORS);
    let name = dev.name().to_string();

    let mem = shared_mem();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq.try_clone().unwrap())
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    let kick = t.queue_eventfds().unwrap().remove(0).1;

    // What the guest sees: the backend's features as far as kiln-vmm
    // supports them, and the backend's config space.
    let offered = features(&mut t);
    assert_ne!(offered & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(offered & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(offered & (1 << VIRTIO_BLK_F_MQ), 0, "{offered:#x}");
    let mut cap = [0u8; 8];
    t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);

    bring_up(&mut t, &mem);
    assert!(t.is_active(), "status {:#x}", t.status());

    // A write lands in the image; a read brings it back; a flush succeeds.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 256) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let ok = VIRTIO_BLK_S_OK as u8;
    assert_eq!(
        request(&mem, &kick, &irq, 0, VIRTIO_BLK_T_OUT, 2048, 8192),
        ok
    );
    // The backend's interrupt bypassed the transport: the status register
    // still tells the driver to look at the used ring.
    assert_eq!(
        r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        1
    );
    assert_eq!(image_bytes(&daemon.image, 2048 * 512, 8192), pattern);
    mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mem, &kick, &irq, 1, VIRTIO_BLK_T_IN, 2048, 8192),
        ok
    );
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    // A reset takes the rings back; a new probe hands them over again.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
    bring_up(&mut t, &mem);
    assert!(t.is_active(), "status {:#x}", t.status());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&daemon.image)
        .unwrap();
    f.seek(SeekFrom::Start(512)).unwrap();
    f.write_all(&[0x5a; 512]).unwrap();
    drop(f);
    assert_eq!(request(&mem, &kick, &irq, 0, VIRTIO_BLK_T_IN, 1, 512), ok);
    let mut sector = [0u8; 512];
    mem.read_slice(&mut sector, GuestAddress(DATA)).unwrap();
    assert_eq!(sector, [0x5a; 512]);

    // The backend goes away: the VMM carries on; the device cannot be
    // activated again and says so to the driver (NEEDS_RESET).
    daemon.kill();
    std::thread::sleep(Duration::from_millis(100));
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    bring_up(&mut t, &mem);
    assert!(!t.is_active());
    assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    drop(t);
    // The worker thread ended with the device.
    assert!(crate::virtio::worker::tests::threads_named(&name).is_empty());
}

#[test]
fn connection_errors_are_clear() {
    let dir = TempDir::new_with_prefix("/tmp/kiln-vublk-").unwrap();
    let sock = dir.as_path().join("nobody.sock");
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&sock).unwrap());
    let err = VhostUserBlock::connect(VhostUserBlockConfig {
        socket: sock.clone(),
        queues: 1,
    })
    .err()
    .unwrap();
    assert!(matches!(err, Error::Connect { .. }));
    assert!(
        err.to_string()
            .contains("is the vhost-user backend running?"),
        "{err}"
    );

    // A listener that is not a vhost-user backend: it hangs up at once.
    let listener = UnixListener::bind(dir.as_path().join("mute.sock")).unwrap();
    let rude = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let err = VhostUserBlock::connect(VhostUserBlockConfig {
        socket: dir.as_path().join("mute.sock"),
        queues: 1,
    })
    .err()
    .unwrap();
    rude.join().unwrap();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
}
