//! Pause, resume and restore against qemu-storage-daemon: the backend
//! gives the rings back (GET_VRING_BASE) with their positions, and takes
//! them again where they were (SET_VRING_BASE; the used index it reads
//! from the ring), on the same connection or a new one.

use super::*;
use crate::virtio::state::{DeviceSnapshot, RestoreError, TransportSnapshot};
use crate::virtio::vhost_user_blk::FindBackend;

pub(super) fn device(daemon: &Daemon) -> VhostUserBlock {
    VhostUserBlock::connect(VhostUserBlockConfig {
        socket: daemon.socket.clone(),
        queues: 1,
    })
    .unwrap()
}

pub(super) fn transport(
    dev: VhostUserBlock,
    mem: &GuestMemoryMmap,
) -> (MmioTransport, EventFd, EventFd) {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem.clone(), Box::new(dev), irq.try_clone().unwrap())
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    let kick = t.queue_eventfds().unwrap().remove(0).1;
    (t, kick, irq)
}

/// A device on `daemon`, brought up by the driver, that has written one
/// block of `fill` at sector 8 (request 0): guest memory, the transport,
/// its kick and its interrupt.
pub(super) fn written_once(
    daemon: &Daemon,
    fill: u8,
) -> (GuestMemoryMmap, MmioTransport, EventFd, EventFd) {
    let mem = shared_mem();
    let (mut t, kick, irq) = transport(device(daemon), &mem);
    bring_up(&mut t, &mem);
    mem.write_slice(&[fill; 4096], GuestAddress(DATA)).unwrap();
    let status = request(&mem, &kick, &irq, 0, VIRTIO_BLK_T_OUT, 8, 4096);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    (mem, t, kick, irq)
}

#[test]
fn the_backend_hands_the_rings_back_and_takes_them_again() {
    let daemon = Daemon::start();
    let (mem, mut t, kick, irq) = written_once(&daemon, 0x11);
    assert!(t.is_active());
    let ok = VIRTIO_BLK_S_OK as u8;
    assert_eq!(request(&mem, &kick, &irq, 1, VIRTIO_BLK_T_IN, 8, 4096), ok);

    t.pause().unwrap();
    let snap = t.snapshot().unwrap();
    assert_eq!(snap.queues[0].next_avail, 2, "GET_VRING_BASE");
    assert_eq!(snap.queues[0].next_used, 2, "the used ring's index");
    let DeviceSnapshot::VhostUserBlock(d) = &snap.device else {
        panic!("{:?}", snap.device)
    };
    assert_eq!(d.queues, 1);
    assert_eq!(d.config[..8], DISK_SECTORS.to_le_bytes());

    // The source goes on: the backend takes the ring where it was.
    t.resume().unwrap();
    mem.write_slice(&[0x22; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mem, &kick, &irq, 2, VIRTIO_BLK_T_OUT, 16, 4096),
        ok
    );
    assert_eq!(image_bytes(&daemon.image, 16 * 512, 4096), vec![0x22; 4096]);

    t.pause().unwrap();
    let snap: TransportSnapshot =
        serde_json::from_str(&serde_json::to_string(&t.snapshot().unwrap()).unwrap()).unwrap();
    assert_eq!(snap.queues[0].next_avail, 3);
    // The restored VM connects anew (the daemon serves one frontend).
    drop(t);

    let (mut t2, kick2, irq2) = transport(device(&daemon), &mem);
    // A disk of another size is refused, naming the socket.
    let mut other = snap.clone();
    if let DeviceSnapshot::VhostUserBlock(d) = &mut other.device {
        d.config[..8].copy_from_slice(&(DISK_SECTORS * 2).to_le_bytes());
    }
    let e = t2.restore(&other).unwrap_err();
    assert!(matches!(e, RestoreError::Capacity { .. }), "{e}");
    assert!(
        e.to_string().contains(&daemon.socket.display().to_string()),
        "{e}"
    );
    assert!(!t2.is_active());

    t2.restore(&snap).unwrap();
    assert!(t2.is_active(), "status {:#x}", t2.status());
    // Restored paused: the backend hears from us when the machine starts.
    assert!(t2.is_paused());
    t2.resume().unwrap();
    assert_eq!(
        request(&mem, &kick2, &irq2, 3, VIRTIO_BLK_T_IN, 8, 4096),
        ok
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x11; 4096]);
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 4, "the used index went on");
    // And a reset still takes the rings back.
    w32(&mut t2, VIRTIO_MMIO_STATUS, 0);
    assert!(!t2.is_active());
}

/// A migration on the same host: the paused source's connection is handed
/// to a new device, which negotiates nothing and sends nothing until it is
/// started; then the backend serves the same rings on it where the source
/// left them (qemu-storage-daemon serves one frontend: a new connection
/// would wait for the source's to close).
#[test]
fn a_handed_over_connection_serves_the_rings_where_the_source_left_them() {
    let daemon = Daemon::start();
    let (mem, mut t, _kick, _irq) = written_once(&daemon, 0x33);
    let ok = VIRTIO_BLK_S_OK as u8;
    t.pause().unwrap();
    let snap = t.snapshot().unwrap();
    let (socket, fd) = t.backend_connection().unwrap();
    assert_eq!(socket, daemon.socket.as_path());
    let handed = std::os::unix::net::UnixStream::from(fd.try_clone_to_owned().unwrap());

    let dev = VhostUserBlock::adopt(
        VhostUserBlockConfig {
            socket: daemon.socket.clone(),
            queues: 1,
        },
        handed,
    );
    // Same guest RAM at the same addresses, as a destination maps a
    // handed-over memfd (qemu-storage-daemon knows the rings by their
    // addresses: see vstate::memory::map_memfd_shared_at in kiln-vmm).
    let (mut t2, kick2, irq2) = transport(dev, &mem);
    // Not filled in from the saved device yet: it cannot start.
    assert_eq!(
        t2.device_type(),
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    );
    t2.restore(&snap).unwrap();
    assert!(t2.is_active() && t2.is_paused());
    // The source goes away (its descriptor closes); the connection lives on.
    drop(t);
    t2.resume().unwrap();
    assert_eq!(
        request(&mem, &kick2, &irq2, 1, VIRTIO_BLK_T_IN, 8, 4096),
        ok
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x33; 4096]);
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 2, "the used index went on");
}

/// A restored device whose backend is found only when the machine starts
/// (a kiln-store volume is attached then, once a migration's source has
/// committed): restored from the saved device without a connection, it
/// connects at `connect_backend` and serves the rings where they were; a
/// backend that cannot be found, or shows another disk, is refused then.
#[test]
fn a_deferred_backend_is_connected_when_the_machine_starts() {
    let daemon = Daemon::start();
    let mem = shared_mem();
    let (mut t, kick, irq) = transport(device(&daemon), &mem);
    bring_up(&mut t, &mem);
    let ok = VIRTIO_BLK_S_OK as u8;
    mem.write_slice(&[0x44; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mem, &kick, &irq, 0, VIRTIO_BLK_T_OUT, 8, 4096), ok);
    t.pause().unwrap();
    let snap = t.snapshot().unwrap();
    drop(t);

    let deferred = |find: FindBackend| VhostUserBlock::deferred("volume vm1", 1, find).unwrap();
    // Not found: the error says why.
    let (mut t1, _, _) = transport(deferred(Box::new(|| Err("no such volume".into()))), &mem);
    t1.restore(&snap).unwrap();
    assert!(t1.backend_connection().is_none());
    assert_eq!(t1.connect_backend().unwrap_err(), "no such volume");
    assert!(
        t1.resume().is_err(),
        "a device never connected cannot start"
    );

    // Another disk size than the guest saw.
    let mut other = snap.clone();
    if let DeviceSnapshot::VhostUserBlock(d) = &mut other.device {
        d.config[..8].copy_from_slice(&(DISK_SECTORS * 2).to_le_bytes());
    }
    let socket = daemon.socket.clone();
    let (mut t2, _, _) = transport(deferred(Box::new(move || Ok(socket))), &mem);
    t2.restore(&other).unwrap();
    let e = t2.connect_backend().unwrap_err();
    assert!(e.contains("sectors"), "{e}");
    drop(t2);

    let socket = daemon.socket.clone();
    let (mut t3, kick3, irq3) = transport(deferred(Box::new(move || Ok(socket))), &mem);
    t3.restore(&snap).unwrap();
    assert!(t3.is_active() && t3.is_paused());
    t3.connect_backend().unwrap();
    t3.resume().unwrap();
    assert_eq!(
        request(&mem, &kick3, &irq3, 1, VIRTIO_BLK_T_IN, 8, 4096),
        ok
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x44; 4096]);
}
