//! Stopping a vhost-user-blk ring as kiln-vmm does for a snapshot or a
//! live migration: `GET_VRING_BASE` while a guest thread keeps posting
//! requests. When it returns, every request counted in the returned base is
//! on the used ring, and the ring is not written any more; restarted with
//! `SET_VRING_BASE` + `SET_VRING_ADDR` (the used index taken from guest
//! memory) the rest are served exactly once, with the data written.
//! Driven by the `vhost` crate's real frontend over memfd guest memory.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::vhost_guest::*;
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 256;
/// Requests posted per round (3 descriptors each, all fit the table).
const N: u16 = 80;
const ROUNDS: u64 = 120;
/// Rounds write distinct blocks modulo this (16 MiB volume).
const REGIONS: u64 = 40;
/// Requests made available at once (the backend pops them in a row).
const BURST: u16 = 4;
const RING: Ring = Ring {
    size: QSIZE,
    desc: 0,
    avail: 0x1000,
    used: 0x2000,
};
const USED: u64 = RING.used;
/// The used ring with its trailing avail_event.
const USED_LEN: usize = 4 + 8 * QSIZE as usize + 2;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x4000;
const DATA: u64 = 0x10_0000;

const UNSERVED: u8 = 0xAA;

fn data_addr(k: u16) -> u64 {
    DATA + u64::from(k) * 4096
}

fn block_data(round: u64, k: u16) -> Vec<u8> {
    pattern(round << 16 | u64::from(k), 4096)
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    RING.used_idx(mem)
}

fn used_ring(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; USED_LEN];
    mem.read_slice(&mut v, GuestAddress(USED)).unwrap();
    v
}

fn statuses(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; usize::from(N)];
    mem.read_slice(&mut v, GuestAddress(STATUS)).unwrap();
    v
}

/// The heads of used entries `from..to` (ring positions, wrapping).
fn used_heads(mem: &GuestMemoryMmap, from: u16, to: u16) -> Vec<u32> {
    let mut heads = Vec::new();
    let mut i = from;
    while i != to {
        heads.push(RING.used_elem(mem, i).0);
        i = i.wrapping_add(1);
    }
    heads
}

struct Guest {
    mem: GuestMemoryMmap,
    frontend: Frontend,
    vring: Vring,
    avail_idx: u16,
}

impl Guest {
    fn connect(sock: &std::path::Path, event_idx: bool) -> Guest {
        let mem = memfd_memory(MEM_SIZE);
        let mut want = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
        if event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        let mut n = connect_frontend(sock, 1, want, 0, VhostUserProtocolFeatures::REPLY_ACK, &mem);
        let vring = Vring::setup(&mut n.frontend, &mem, 0, RING);
        Guest {
            mem,
            frontend: n.frontend,
            vring,
            avail_idx: 0,
        }
    }

    /// (Re)starts the ring as a restoring VMM does.
    fn start(&self, base: u16) {
        self.vring.start(&self.frontend, base);
    }

    /// Waits until the used index reaches `want` (60 s at most: a ring
    /// that never gets there is the failure).
    fn wait_used(&self, want: u16) {
        let t = Instant::now();
        while used_idx(&self.mem) != want {
            let _ = self.vring.call.read();
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "used index {} never reached {want}",
                used_idx(&self.mem)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The guest's thread: writes of `N` blocks, made available and kicked
/// `BURST` at a time; `posted` counts them.
fn post_round(
    mem: GuestMemoryMmap,
    kick: EventFd,
    mut avail: u16,
    round: u64,
    posted: Arc<AtomicUsize>,
    event_idx: bool,
) {
    for k in 0..N {
        let hdr = HDR + 16 * u64::from(k);
        let sector = ((round % REGIONS) * u64::from(N) + u64::from(k)) * 8;
        write_header(&mem, hdr, T_OUT, sector);
        mem.write_slice(&block_data(round, k), GuestAddress(data_addr(k)))
            .unwrap();
        let d = 3 * k;
        RING.write_desc(&mem, d, hdr, 16, F_NEXT, d + 1);
        RING.write_desc(&mem, d + 1, data_addr(k), 4096, F_NEXT, d + 2);
        RING.write_desc(&mem, d + 2, STATUS + u64::from(k), 1, F_WRITE, 0);
        RING.put_avail(&mem, avail, d);
        if event_idx {
            // used_event: interrupt on every completion.
            RING.set_used_event(&mem, used_idx(&mem));
        }
        avail = avail.wrapping_add(1);
        if (k + 1) % BURST == 0 || k + 1 == N {
            RING.publish(&mem, avail);
            kick.write(1).unwrap();
            posted.store(usize::from(k + 1), Ordering::SeqCst);
        }
    }
}

fn quiesce_rounds(event_idx: bool) {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    n1.create_volume("qz", "16M", &[&n1]);
    let sock = t.path().join("qz.sock");
    n1.cli_ok(&[
        "attach",
        "qz",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--queues",
        "1",
    ]);
    let mut g = Guest::connect(&sock, event_idx);
    let mut stopped_mid_round = 0;
    for round in 0..ROUNDS {
        let u0 = g.avail_idx;
        assert_eq!(used_idx(&g.mem), u0);
        g.mem
            .write_slice(&[UNSERVED; N as usize], GuestAddress(STATUS))
            .unwrap();
        let posted = Arc::new(AtomicUsize::new(0));
        let poster = {
            let (mem, kick, posted) = (
                g.mem.clone(),
                g.vring.kick.try_clone().unwrap(),
                posted.clone(),
            );
            std::thread::spawn(move || post_round(mem, kick, u0, round, posted, event_idx))
        };
        // Stop at a different point of each round (some before the first
        // request, some after the last).
        let at = (round as usize * 7) % (usize::from(N) + 10);
        while posted.load(Ordering::SeqCst) < at.min(usize::from(N)) {
            std::hint::spin_loop();
        }
        let base = g.frontend.get_vring_base(0).unwrap() as u16;
        // Every request counted in the base is completed: nothing popped
        // is left to complete after the frontend reads the used index.
        let used = used_idx(&g.mem);
        assert_eq!(used, base, "round {round}: used index after GET_VRING_BASE");
        let done = base.wrapping_sub(u0);
        assert!(done <= N, "round {round}: base {base} from {u0}");
        let ring = used_ring(&g.mem);
        let st = statuses(&g.mem);
        // Signals of the completions before the stop.
        let _ = g.vring.call.read();
        poster.join().unwrap();
        g.avail_idx = u0.wrapping_add(N);
        // Give a late completion (or notification write) every chance to
        // show: the ring and the requests stay exactly as they were.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            used_ring(&g.mem) == ring,
            "round {round}: the used ring changed after GET_VRING_BASE"
        );
        assert_eq!(
            statuses(&g.mem),
            st,
            "round {round}: a request was served after GET_VRING_BASE"
        );
        assert!(
            g.vring.call.read().is_err(),
            "round {round}: the guest was signalled after GET_VRING_BASE"
        );
        // Exactly the first `done` requests were served, each once.
        for (k, s) in st.iter().enumerate() {
            let want = if k < usize::from(done) {
                S_OK
            } else {
                UNSERVED
            };
            assert_eq!(
                *s, want,
                "round {round}: status of request {k} (base {done})"
            );
        }
        let mut heads = used_heads(&g.mem, u0, base);
        heads.sort_unstable();
        let want: Vec<u32> = (0..u32::from(done)).map(|k| 3 * k).collect();
        assert_eq!(heads, want, "round {round}: used entries before the stop");
        if done > 0 && done < N {
            stopped_mid_round += 1;
        }

        // Restart where it stopped; the rest are served, each once.
        g.start(base);
        g.vring.kick.write(1).unwrap();
        g.wait_used(g.avail_idx);
        assert!(
            statuses(&g.mem).iter().all(|s| *s == S_OK),
            "round {round}: {:?}",
            statuses(&g.mem)
        );
        let mut heads = used_heads(&g.mem, u0, g.avail_idx);
        heads.sort_unstable();
        let want: Vec<u32> = (0..u32::from(N)).map(|k| 3 * k).collect();
        assert_eq!(heads, want, "round {round}: used entries after the restart");
        // Every write of the round landed, with its own data.
        let region = (round % REGIONS) * u64::from(N) * 4096;
        let got = n1.replica_read("qz", region, u64::from(N) * 4096).data;
        for k in 0..N {
            let at = usize::from(k) * 4096;
            assert!(
                got[at..at + 4096] == block_data(round, k)[..],
                "round {round}: block {k} on the volume"
            );
        }
    }
    assert!(
        stopped_mid_round > 0,
        "no round was stopped with requests both served and pending"
    );
}

#[test]
fn get_vring_base_under_load_settles_the_ring_and_a_restart_serves_the_rest() {
    quiesce_rounds(false);
}

#[test]
fn the_same_with_event_idx() {
    quiesce_rounds(true);
}
