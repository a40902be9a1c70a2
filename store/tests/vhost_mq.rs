//! The vhost-user-blk export with several queues, each with many requests
//! in flight at once, driven by the `vhost` crate's real frontend over
//! memfd guest memory (as in `vhost_blk.rs`); a read-only export; and the
//! config-change message a resize sends to the frontend.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::vhost_guest::*;
use common::*;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 128;
/// Requests each queue has in flight at once.
const DEPTH: u16 = 32;
const DATA: u64 = 0x40_0000;

const F_FLUSH: u64 = 1 << 9;
const F_BLK_SIZE: u64 = 1 << 6;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_MQ: u64 = 1 << 12;

/// Where queue `q`'s rings and request headers live.
fn qbase(q: u16) -> u64 {
    u64::from(q) * 0x1_0000
}

/// Queue `q`'s descriptor table, avail and used rings.
fn ring(q: u16) -> Ring {
    let b = qbase(q);
    Ring {
        size: QSIZE,
        desc: b,
        avail: b + 0x1000,
        used: b + 0x2000,
    }
}

/// The data buffer of request slot `i` of queue `q` (one 4 KiB block).
fn data_addr(q: u16, i: u16) -> u64 {
    DATA + (u64::from(q) * u64::from(QSIZE) + u64::from(i)) * 4096
}

struct Queue {
    vring: Vring,
    avail_idx: u16,
    used_idx: u16,
}

/// A VMM stand-in with several virtqueues.
struct Guest {
    mem: GuestMemoryMmap,
    frontend: Frontend,
    queues: Vec<Queue>,
    features: u64,
}

/// One request: (type, sector, device-writable data?).
#[derive(Clone, Copy)]
struct Req(u32, u64, bool);

impl Guest {
    fn connect(sock: &Path, nq: u16) -> Guest {
        let mem = memfd_memory(MEM_SIZE);
        let mut n = connect_frontend(
            sock,
            u64::from(nq),
            0,
            VIRTIO_F_VERSION_1
                | VHOST_USER_F_PROTOCOL_FEATURES
                | F_FLUSH
                | F_BLK_SIZE
                | F_SEG_MAX
                | F_RO
                | F_MQ,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ,
            &mem,
        );
        assert!(n.protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ));
        let queues = (0..nq)
            .map(|q| Queue {
                vring: Vring::setup(&mut n.frontend, &mem, usize::from(q), ring(q)),
                avail_idx: 0,
                used_idx: 0,
            })
            .collect();
        Guest {
            mem,
            frontend: n.frontend,
            queues,
            features: n.features,
        }
    }

    fn config(&mut self) -> Vec<u8> {
        let (_, cfg) = self
            .frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        cfg
    }

    fn write_desc(&self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        ring(q).write_desc(&self.mem, i, addr, len, flags, next);
    }

    /// Lays out request `k` of queue `q` in descriptors 3k..3k+2 (header,
    /// one data block, status) and puts it on the avail ring (not kicked).
    fn put(&mut self, q: u16, k: u16, r: Req) {
        let b = qbase(q);
        let hdr = b + 0x3000 + 16 * u64::from(k);
        let status = b + 0x4000 + u64::from(k);
        write_header(&self.mem, hdr, r.0, r.1);
        self.mem.write_obj(0xAAu8, GuestAddress(status)).unwrap();
        let d = 3 * k;
        if r.0 == T_FLUSH {
            self.write_desc(q, d, hdr, 16, F_NEXT, d + 2);
        } else {
            self.write_desc(q, d, hdr, 16, F_NEXT, d + 1);
            let w = if r.2 { F_WRITE } else { 0 };
            self.write_desc(q, d + 1, data_addr(q, k), 4096, w | F_NEXT, d + 2);
        }
        self.write_desc(q, d + 2, status, 1, F_WRITE, 0);
        let qu = &mut self.queues[usize::from(q)];
        ring(q).put_avail(&self.mem, qu.avail_idx, d);
        qu.avail_idx = qu.avail_idx.wrapping_add(1);
        ring(q).publish(&self.mem, qu.avail_idx);
    }

    fn status(&self, q: u16, k: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(qbase(q) + 0x4000 + u64::from(k)))
            .unwrap()
    }

    /// Puts `reqs[q]` on every queue q at once, kicks them all, waits until
    /// every one is used; returns the statuses.
    fn run(&mut self, reqs: &[Vec<Req>]) -> Vec<Vec<u8>> {
        for (q, rs) in reqs.iter().enumerate() {
            for (k, r) in rs.iter().enumerate() {
                self.put(q as u16, k as u16, *r);
            }
        }
        for qu in &self.queues {
            qu.vring.kick.write(1).unwrap();
        }
        let t = Instant::now();
        for (q, rs) in reqs.iter().enumerate() {
            let want = self.queues[q].used_idx.wrapping_add(rs.len() as u16);
            loop {
                let _ = self.queues[q].vring.call.read();
                let used = ring(q as u16).used_idx(&self.mem);
                if used == want {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "queue {q}: {} of {} requests used",
                    used.wrapping_sub(self.queues[q].used_idx),
                    rs.len()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            self.queues[q].used_idx = want;
        }
        reqs.iter()
            .enumerate()
            .map(|(q, rs)| {
                (0..rs.len())
                    .map(|k| self.status(q as u16, k as u16))
                    .collect()
            })
            .collect()
    }
}

fn block(q: u16, k: u16, round: u64) -> Vec<u8> {
    pattern(round << 32 | u64::from(q) << 16 | u64::from(k), 4096)
}

fn setup(base: &Path, args: &[&str]) -> (Node, Node, PathBuf) {
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("mq", "8M", &[&n1, &n2]);
    let sock = base.join("mq.sock");
    let mut a = vec!["attach", "mq", "--vhost-user", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    n1.cli_ok(&a);
    (n1, n2, sock)
}

#[test]
fn four_queues_with_many_requests_in_flight_each() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2, sock) = setup(t.path(), &["--queues", "4"]);
    let mut g = Guest::connect(&sock, 4);
    assert_ne!(g.features & F_MQ, 0, "VIRTIO_BLK_F_MQ not offered");
    assert_eq!(g.features & F_RO, 0);
    let cfg = g.config();
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 4);
    let mut model = vec![0u8; 8 << 20];
    for round in 0..3u64 {
        // Every queue writes DEPTH distinct blocks at once (each queue its
        // own stripe; the rounds overwrite them).
        let mut reqs = Vec::new();
        for q in 0..4u16 {
            let mut rs = Vec::new();
            for k in 0..DEPTH {
                let blk = u64::from(k) * 4 + u64::from(q) + round * 128;
                let data = block(q, k, round);
                g.mem
                    .write_slice(&data, GuestAddress(data_addr(q, k)))
                    .unwrap();
                model[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
                rs.push(Req(T_OUT, blk * 8, false));
            }
            reqs.push(rs);
        }
        let st = g.run(&reqs);
        assert!(st.iter().flatten().all(|s| *s == S_OK), "{st:?}");
        // A flush on one queue covers what the others completed.
        let st = g.run(&[vec![Req(T_FLUSH, 0, true)]]);
        assert_eq!(st[0][0], S_OK);
    }
    // Read everything back through all queues at once.
    let mut reqs = Vec::new();
    for q in 0..4u16 {
        reqs.push(
            (0..DEPTH)
                .map(|k| {
                    Req(
                        T_IN,
                        (u64::from(q) * u64::from(DEPTH) + u64::from(k)) * 8,
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    // And one read past the end among them: it fails alone.
    reqs[0].push(Req(T_IN, (8 << 20) / 512, true));
    let st = g.run(&reqs);
    assert_eq!(st[0][usize::from(DEPTH)], S_IOERR);
    assert!(
        st.iter()
            .flatten()
            .take(usize::from(DEPTH))
            .all(|s| *s == S_OK)
            && st[1..].iter().flatten().all(|s| *s == S_OK),
        "{st:?}"
    );
    for q in 0..4u16 {
        for k in 0..DEPTH {
            let blk = (u64::from(q) * u64::from(DEPTH) + u64::from(k)) as usize;
            let mut got = vec![0u8; 4096];
            g.mem
                .read_slice(&mut got, GuestAddress(data_addr(q, k)))
                .unwrap();
            assert!(got == model[blk * 4096..(blk + 1) * 4096], "block {blk}");
        }
    }
    for n in [&n1, &n2] {
        assert!(
            n.replica_read_all("mq", 8 << 20) == model,
            "replica on {}",
            n.id
        );
    }
    // n1 holds a replica in sync, so reads popped together were served
    // together.
    drop(g);
    let (line, count) = session_counts(&n1);
    let (batches, reads) = (count("read_batches="), count("batched_reads="));
    assert!(
        batches > 0 && reads == 4 * u64::from(DEPTH) + 1 && reads > batches,
        "{line}"
    );
}

/// The export's session line (logged when the frontend goes), and a
/// reader of its counters.
fn session_counts(n: &Node) -> (String, impl Fn(&str) -> u64) {
    let t = Instant::now();
    let line = loop {
        if let Some(l) = n
            .log()
            .lines()
            .find(|l| l.contains("vhost-user-blk session:"))
        {
            break l.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no session line in the log"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let l = line.clone();
    let count = move |key: &str| -> u64 {
        let at = l.find(key).unwrap_or_else(|| panic!("no {key} in {l}"));
        l[at + key.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (line, count)
}

#[test]
fn small_writes_of_a_volume_held_here_are_told_to_the_guest_together() {
    // A 1-replica volume: its small writes are served by the thread that
    // pops them, and the guest hears of those popped together once.
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    n1.create_volume("solo", "8M", &[&n1]);
    let sock = t.path().join("solo.sock");
    n1.cli_ok(&["attach", "solo", "--vhost-user", sock.to_str().unwrap()]);
    let mut g = Guest::connect(&sock, 1);
    let mut model = vec![0u8; 8 << 20];
    let mut reqs = Vec::new();
    for k in 0..DEPTH {
        let blk = u64::from(k) * 3 + 1;
        let data = block(0, k, 9);
        g.mem
            .write_slice(&data, GuestAddress(data_addr(0, k)))
            .unwrap();
        model[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
        reqs.push(Req(T_OUT, blk * 8, false));
    }
    let st = g.run(&[reqs]);
    assert!(st[0].iter().all(|s| *s == S_OK), "{st:?}");
    let st = g.run(&[vec![Req(T_FLUSH, 0, true)]]);
    assert_eq!(st[0][0], S_OK);
    assert!(n1.replica_read_all("solo", 8 << 20) == model);
    drop(g);
    // 33 requests, each of which wants an interrupt (no EVENT_IDX): the 32
    // writes kicked at once are told together, the flush on its own.
    let (line, count) = session_counts(&n1);
    assert_eq!(count("requests="), u64::from(DEPTH) + 1, "{line}");
    let interrupts = count("interrupts=");
    assert!((2..=4).contains(&interrupts), "{line}");
}

#[test]
fn a_read_only_export_refuses_writes() {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    n1.create_volume("mq", "8M", &[&n1]);
    let before = pattern(7, 4096);
    let v = kiln_store::VolumeClient::open(&n1.socket, "mq").unwrap();
    kiln_store::VolumeIo::write_at(&v, &before, 0).unwrap();
    let sock = t.path().join("ro.sock");
    n1.cli_ok(&[
        "attach",
        "mq",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--read-only",
        "--queues",
        "2",
    ]);
    let mut g = Guest::connect(&sock, 2);
    assert_ne!(g.features & F_RO, 0, "VIRTIO_BLK_F_RO not offered");
    g.mem
        .write_slice(&pattern(8, 4096), GuestAddress(data_addr(0, 0)))
        .unwrap();
    let st = g.run(&[vec![Req(T_OUT, 0, false)], vec![Req(T_IN, 0, true)]]);
    assert_eq!(st[0][0], S_IOERR, "a write to a read-only export");
    assert_eq!(st[1][0], S_OK, "a read of a read-only export");
    let mut got = vec![0u8; 4096];
    g.mem
        .read_slice(&mut got, GuestAddress(data_addr(1, 0)))
        .unwrap();
    assert!(got == before);
    assert!(
        n1.replica_read("mq", 0, 4096).data == before,
        "the volume changed"
    );
}

/// The frontend's side of the backend-request channel: counts config
/// changes.
struct ConfigWatch(std::sync::mpsc::Sender<()>);

impl VhostUserFrontendReqHandlerMut for ConfigWatch {
    fn handle_config_change(&mut self) -> vhost::vhost_user::HandlerResult<u64> {
        let _ = self.0.send(());
        Ok(0)
    }
}

#[test]
fn a_resize_sends_the_config_change_message() {
    let t = tempfile::tempdir().unwrap();
    let (n1, _n2, sock) = setup(t.path(), &["--queues", "1"]);
    let mut g = Guest::connect(&sock, 1);
    let cap = |g: &mut Guest| u64::from_le_bytes(g.config()[0..8].try_into().unwrap());
    assert_eq!(cap(&mut g), (8 << 20) / 512);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handler =
        FrontendReqHandler::new(std::sync::Arc::new(std::sync::Mutex::new(ConfigWatch(tx))))
            .unwrap();
    g.frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .unwrap();
    // The frontend's thread serving the channel, as a VMM's would.
    std::thread::spawn(move || while handler.handle_request().is_ok() {});
    n1.cli_ok(&["resize", "mq", "--size", "16M"]);
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no config-change message after the resize");
    assert_eq!(cap(&mut g), (16 << 20) / 512);
    // I/O goes on, now past the old end.
    g.mem
        .write_slice(&pattern(9, 4096), GuestAddress(data_addr(0, 0)))
        .unwrap();
    let st = g.run(&[vec![Req(T_OUT, (12 << 20) / 512, false)]]);
    assert_eq!(st[0][0], S_OK);
}
