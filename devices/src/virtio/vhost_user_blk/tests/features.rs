//! Several queues and deadlines for a backend that does not answer,
//! against qemu-storage-daemon and real Unix sockets.

use super::super::handshake::Negotiated;
use super::*;

/// Queue `q`'s rings, header, status and data: queue 0's moved by q times
/// this.
const QSTRIDE: u64 = 0x2_0000;
/// Offset of `num_queues` in the config space.
const NUM_QUEUES: u64 = 34;

fn connect(daemon: &Daemon, queues: u16) -> Result<VhostUserBlock, Error> {
    VhostUserBlock::connect(VhostUserBlockConfig {
        socket: daemon.socket.clone(),
        queues,
    })
}

fn transport(dev: VhostUserBlock, mem: &GuestMemoryMmap, irq: &EventFd) -> MmioTransport {
    MmioTransport::new(mem.clone(), Box::new(dev), irq.try_clone().unwrap())
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap()
}

/// Like `bring_up`, with `n` queues (queue q at DESC + q * QSTRIDE) and
/// `extra` features acked besides VERSION_1 and FLUSH.
fn bring_up_queues(t: &mut MmioTransport, mem: &GuestMemoryMmap, n: u32, extra: u64) {
    for q in 0..u64::from(n) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC + q * QSTRIDE))
            .unwrap();
    }
    w32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w32(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | extra;
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
    for q in 0..n {
        let off = u64::from(q) * QSTRIDE;
        w32(t, VIRTIO_MMIO_QUEUE_SEL, q);
        w32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, (DESC + off) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (AVAIL + off) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, (USED + off) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w32(
        t,
        VIRTIO_MMIO_STATUS,
        features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// One request on queue `q` (entry `n` of that queue since bring-up), data
/// at DATA + q * QSTRIDE; waits for its used entry and returns its status.
fn request_on(
    mem: &GuestMemoryMmap,
    kick: &EventFd,
    q: u64,
    n: u16,
    t: u32,
    sector: u64,
    len: u32,
) -> u8 {
    let off = q * QSTRIDE;
    let (hdr, data, status) = (HDR + off, DATA + off, STATUS + off);
    mem.write_obj(t, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let data_flags = if t == VIRTIO_BLK_T_IN {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    let chain = [
        (hdr, 16u32, VRING_DESC_F_NEXT),
        (data, len, data_flags | VRING_DESC_F_NEXT),
        (status, 1, VRING_DESC_F_WRITE),
    ];
    for (i, (addr, len, flags)) in chain.iter().enumerate() {
        let d = DESC + off + 16 * i as u64;
        mem.write_obj(*addr, GuestAddress(d)).unwrap();
        mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(*flags as u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
    }
    let slot = u64::from(n % QSIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + off + 4 + 2 * slot))
        .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj(n + 1, GuestAddress(AVAIL + off + 2)).unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used: u16 = mem.read_obj(GuestAddress(USED + off + 2)).unwrap();
        if used == n + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no used entry on queue {q}");
        std::thread::sleep(Duration::from_millis(5));
    }
    mem.read_obj(GuestAddress(status)).unwrap()
}

fn config_u16(t: &mut MmioTransport, off: u64) -> u16 {
    let mut b = [0u8; 2];
    t.read(u64::from(VIRTIO_MMIO_CONFIG) + off, &mut b);
    u16::from_le_bytes(b)
}

#[test]
fn two_queues_with_qemu_storage_daemon() {
    let daemon = Daemon::start_with(2);
    // More queues than the backend serves: refused, clearly.
    let err = connect(&daemon, 4).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::TooFewQueues { .. }), "{msg}");
    assert!(
        msg.contains("queues=4") && msg.contains("serves 2"),
        "{msg}"
    );
    assert!(msg.contains(&daemon.socket.display().to_string()), "{msg}");
    // One queue of a two-queue backend: no MQ for the guest.
    let one = connect(&daemon, 1).unwrap();
    let mem = shared_mem();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = transport(one, &mem, &irq);
    assert_eq!(features(&mut t) & (1 << VIRTIO_BLK_F_MQ), 0);
    drop(t);

    let dev = connect(&daemon, 2).unwrap();
    let mut t = transport(dev, &mem, &irq);
    assert_ne!(features(&mut t) & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(config_u16(&mut t, NUM_QUEUES), 2);
    let kicks: Vec<EventFd> = t
        .queue_eventfds()
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert_eq!(kicks.len(), 2);
    bring_up_queues(&mut t, &mem, 2, 1 << VIRTIO_BLK_F_MQ);
    assert!(t.is_active(), "status {:#x}", t.status());
    let ok = VIRTIO_BLK_S_OK as u8;
    for q in 0..2u64 {
        mem.write_slice(&[0x60 + q as u8; 4096], GuestAddress(DATA + q * QSTRIDE))
            .unwrap();
        let sector = 100 + 100 * q;
        assert_eq!(
            request_on(
                &mem,
                &kicks[q as usize],
                q,
                0,
                VIRTIO_BLK_T_OUT,
                sector,
                4096
            ),
            ok
        );
        assert_eq!(
            image_bytes(&daemon.image, sector * 512, 4096),
            vec![0x60 + q as u8; 4096]
        );
    }
    // What queue 0 wrote reads back through queue 1.
    assert_eq!(
        request_on(&mem, &kicks[1], 1, 1, VIRTIO_BLK_T_IN, 100, 4096),
        ok
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA + QSTRIDE))
        .unwrap();
    assert_eq!(back, vec![0x60; 4096]);

    // A driver that uses one queue of the two.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    bring_up_queues(&mut t, &mem, 1, 1 << VIRTIO_BLK_F_MQ);
    assert!(t.is_active(), "status {:#x}", t.status());
    assert_eq!(
        request_on(&mem, &kicks[0], 0, 0, VIRTIO_BLK_T_IN, 200, 4096),
        ok
    );
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x61; 4096]);
}

#[test]
fn a_backend_that_never_answers_is_hung_up_on() {
    let dir = TempDir::new_with_prefix("/tmp/kiln-vublk-").unwrap();
    let sock = dir.as_path().join("silent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Accepts, reads whatever comes, never answers; ends when hung up on.
    let silent = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let err = Negotiated::connect_within(&sock, 1, Duration::from_secs(1))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::NoAnswer { .. }), "{msg}");
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    assert!(msg.contains("did not answer within 1 s"), "{msg}");
    silent.join().unwrap();
}

/// A backend that stops answering (the daemon is SIGSTOPped) holds neither
/// the vCPU activating the device nor the one resetting it: each gives up
/// after the vCPU deadline, hangs up, and the device needs a reset.
#[test]
fn activation_and_reset_give_up_on_a_stopped_backend() {
    let stop = |d: &Daemon, sig| {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(d.child.id() as i32, sig) }, 0);
    };
    let mem = shared_mem();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();

    // Stopped before the driver starts the device.
    let mut daemon = Daemon::start();
    let mut t = transport(connect(&daemon, 1).unwrap(), &mem, &irq);
    stop(&daemon, libc::SIGSTOP);
    bring_up(&mut t, &mem);
    assert!(!t.is_active());
    assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    stop(&daemon, libc::SIGCONT);
    daemon.kill();
    drop(t);

    // Stopped while the device runs: the reset returns all the same.
    let mut daemon = Daemon::start();
    let mut t = transport(connect(&daemon, 1).unwrap(), &mem, &irq);
    bring_up(&mut t, &mem);
    assert!(t.is_active());
    stop(&daemon, libc::SIGSTOP);
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
    bring_up(&mut t, &mem);
    assert!(!t.is_active());
    assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    stop(&daemon, libc::SIGCONT);
    daemon.kill();
}
