//! Many writers at once against a 3-replica volume: every replica ends
//! identical and equal to a model of the acknowledged writes; also with a
//! replica killed and restarted mid-run (it resyncs), and with the writer
//! killed (what was acknowledged is on the survivors).
//!
//! The model: each write has a unique content per block and is stamped
//! with a global tick when it is submitted and when it is acknowledged.
//! A block may hold the content of any write W covering it unless a write
//! W' covering it was acknowledged and submitted after W was acknowledged
//! (then W' or a later one must be there); a block no acknowledged write
//! covers may also read as zeros. Most writes go to ranges their thread
//! owns, where this pins the outcome down to one write; some race each
//! other on a shared range, where it admits the racing ones but still
//! requires all replicas to agree; and sub-block writes of different
//! threads to different sectors of the same blocks check that concurrent
//! read-modify-writes lose nothing. No assertion depends on timing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kiln_store::{VolumeClient, VolumeIo};

const BS: u64 = 4096;
/// 16 MiB volume.
const BLOCKS: u64 = 4096;
const THREADS: u64 = 6;
/// Owned area: 16-block chunks, chunk c belongs to thread c % THREADS.
const OWNED_END: u64 = 3072;
const CHUNK: u64 = 16;
/// Shared area where writes race.
const SHARED: (u64, u64) = (3072, 3104);
/// Sector area: thread t writes sector t of each of these blocks.
const SECTORS: (u64, u64) = (3200, 3208);

#[derive(Debug, Clone)]
struct Rec {
    id: u64,
    first: u64,
    n: u64,
    submit: u64,
    ack: Option<u64>,
}

#[derive(Default)]
struct Log {
    writes: Vec<Rec>,
    /// (block, sector) → id of the last acknowledged sector write, and of
    /// one in flight.
    sectors: std::collections::HashMap<(u64, u64), (Option<u64>, Option<u64>)>,
}

fn block_data(id: u64, b: u64) -> Vec<u8> {
    pattern(id << 20 | b, BS as usize)
}

fn sector_data(id: u64) -> Vec<u8> {
    pattern(id << 20 | 0xfffff, 512)
}

struct Run {
    log: Arc<Mutex<Log>>,
    tick: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Starts `THREADS` writers on `socket`'s volume `vol`; each does `ops`
/// operations (or stops at its first error, or when told to).
fn start_writers(
    socket: &std::path::Path,
    vol: &str,
    ops: u64,
) -> (Run, Vec<std::thread::JoinHandle<()>>) {
    let run = Run {
        log: Arc::new(Mutex::new(Log::default())),
        tick: Arc::new(AtomicU64::new(1)),
        ops: Arc::new(AtomicU64::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let v = VolumeClient::open(socket, vol).unwrap();
        let (log, tick, count, stop) = (
            run.log.clone(),
            run.tick.clone(),
            run.ops.clone(),
            run.stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x1234_5678 + t * 7919);
            for k in 0..ops {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let id = (t << 32) | (k + 1);
                let ok = match rng.below(20) {
                    0 => v.flush().is_ok(),
                    1..=3 => {
                        // A sector of a block other threads write too.
                        let b = SECTORS.0 + rng.below(SECTORS.1 - SECTORS.0);
                        log.lock().unwrap().sectors.entry((b, t)).or_default().1 = Some(id);
                        let r = v.write_at(&sector_data(id), b * BS + t * 512);
                        if r.is_ok() {
                            let mut l = log.lock().unwrap();
                            let e = l.sectors.entry((b, t)).or_default();
                            *e = (Some(id), None);
                        }
                        r.is_ok()
                    }
                    kind => {
                        let (first, n) = if kind <= 8 {
                            let n = 1 + rng.below(8);
                            (SHARED.0 + rng.below(SHARED.1 - SHARED.0 - n), n)
                        } else {
                            let chunks = OWNED_END / CHUNK / THREADS;
                            let c = t + THREADS * rng.below(chunks);
                            let n = 1 + rng.below(CHUNK);
                            (c * CHUNK + rng.below(CHUNK - n + 1), n)
                        };
                        let mut data = Vec::with_capacity((n * BS) as usize);
                        for b in first..first + n {
                            data.extend(block_data(id, b));
                        }
                        let idx = {
                            let mut l = log.lock().unwrap();
                            l.writes.push(Rec {
                                id,
                                first,
                                n,
                                submit: tick.fetch_add(1, Ordering::SeqCst),
                                ack: None,
                            });
                            l.writes.len() - 1
                        };
                        let r = v.write_at(&data, first * BS);
                        if r.is_ok() {
                            let at = tick.fetch_add(1, Ordering::SeqCst);
                            log.lock().unwrap().writes[idx].ack = Some(at);
                        }
                        r.is_ok()
                    }
                };
                if !ok {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    (run, threads)
}

/// Checks a whole image of the volume against the model.
fn check(image: &[u8], log: &Log, what: &str) {
    let mut cover: Vec<Vec<usize>> = vec![Vec::new(); BLOCKS as usize];
    for (i, w) in log.writes.iter().enumerate() {
        for b in w.first..w.first + w.n {
            cover[b as usize].push(i);
        }
    }
    for b in 0..BLOCKS {
        if (SECTORS.0..SECTORS.1).contains(&b) {
            continue;
        }
        let got = &image[(b * BS) as usize..((b + 1) * BS) as usize];
        let ws: Vec<&Rec> = cover[b as usize].iter().map(|i| &log.writes[*i]).collect();
        let superseded = |w: &Rec| {
            ws.iter()
                .any(|o| o.id != w.id && o.ack.is_some() && w.ack.is_some_and(|a| a < o.submit))
        };
        let zeros_ok = ws.iter().all(|w| w.ack.is_none());
        let ok = (zeros_ok && got.iter().all(|x| *x == 0))
            || ws
                .iter()
                .filter(|w| !superseded(w))
                .any(|w| got == block_data(w.id, b).as_slice());
        assert!(
            ok,
            "{what}: block {b} holds none of the writes that may be there ({} cover it)",
            ws.len()
        );
    }
    for b in SECTORS.0..SECTORS.1 {
        for t in 0..THREADS {
            let at = (b * BS + t * 512) as usize;
            let got = &image[at..at + 512];
            let (acked, pending) = log.sectors.get(&(b, t)).copied().unwrap_or_default();
            let ok = match acked {
                Some(id) => got == sector_data(id).as_slice(),
                None => got.iter().all(|x| *x == 0),
            } || pending.is_some_and(|id| got == sector_data(id).as_slice());
            assert!(ok, "{what}: sector {t} of block {b} lost a write");
        }
    }
}

fn create3(t: &std::path::Path) -> Vec<Node> {
    let nodes = vec![
        Node::new(t, "n1", 2),
        Node::new(t, "n2", 1),
        Node::new(t, "n3", 1),
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    nodes[0].create_volume("vol", "16M", &refs);
    nodes
}

fn wait_ops(run: &Run, n: u64) {
    wait_until("writers to make progress", Duration::from_secs(120), || {
        run.ops.load(Ordering::SeqCst) >= n
    });
}

fn all_in_sync(n: &Node) -> bool {
    n.status("vol")
        .replicas
        .iter()
        .all(|r| r.state == "in-sync")
}

fn assert_replicas_equal(nodes: &[&Node], log: &Log) -> Vec<u8> {
    let first = nodes[0].replica_read_all("vol", BLOCKS * BS);
    for n in &nodes[1..] {
        assert!(
            n.replica_read_all("vol", BLOCKS * BS) == first,
            "replica on {} differs from the one on {}",
            n.id,
            nodes[0].id
        );
    }
    check(&first, log, "replicas");
    first
}

#[test]
fn concurrent_writers_leave_identical_replicas_matching_the_model() {
    let t = tempfile::tempdir().unwrap();
    let nodes = create3(t.path());
    let (run, threads) = start_writers(&nodes[0].socket, "vol", 150);
    for th in threads {
        th.join().unwrap();
    }
    let v = VolumeClient::open(&nodes[0].socket, "vol").unwrap();
    v.flush().unwrap();
    let log = run.log.lock().unwrap();
    assert!(log.writes.iter().all(|w| w.ack.is_some()), "a write failed");
    let mut back = vec![0u8; (BLOCKS * BS) as usize];
    v.read_at(&mut back, 0).unwrap();
    check(&back, &log, "writer read-back");
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(assert_replicas_equal(&refs, &log) == back);
    assert!(all_in_sync(&nodes[0]));
}

#[test]
fn a_replica_killed_and_restarted_mid_run_resyncs_to_identical() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = create3(t.path());
    let (run, threads) = start_writers(&nodes[0].socket, "vol", 200);
    wait_ops(&run, 150);
    nodes[2].kill9();
    wait_ops(&run, 500);
    nodes[2].start();
    for th in threads {
        th.join().unwrap();
    }
    let v = VolumeClient::open(&nodes[0].socket, "vol").unwrap();
    v.flush().unwrap();
    wait_until("n3 to resync", Duration::from_secs(120), || {
        all_in_sync(&nodes[0])
    });
    let log = run.log.lock().unwrap();
    assert!(log.writes.iter().all(|w| w.ack.is_some()), "a write failed");
    let refs: Vec<&Node> = nodes.iter().collect();
    assert_replicas_equal(&refs, &log);
    let st = nodes[0].status("vol");
    assert!(st.resync_regions > 0, "{st:?}");
}

#[test]
fn a_killed_writer_leaves_every_acknowledged_write_on_the_survivors() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = create3(t.path());
    let (run, threads) = start_writers(&nodes[0].socket, "vol", 100_000);
    wait_ops(&run, 300);
    nodes[0].kill9();
    run.stop.store(true, Ordering::SeqCst);
    for th in threads {
        th.join().unwrap();
    }
    // A survivor becomes the writer (2 of 3 replicas: a majority); it
    // reconciles what was in flight.
    nodes[1].cli_ok(&["attach", "vol"]);
    let log = run.log.lock().unwrap();
    assert!(log.writes.iter().filter(|w| w.ack.is_some()).count() > 100);
    let v = VolumeClient::open(&nodes[1].socket, "vol").unwrap();
    let mut back = vec![0u8; (BLOCKS * BS) as usize];
    v.read_at(&mut back, 0).unwrap();
    check(&back, &log, "new writer's read-back");
    let image = assert_replicas_equal(&[&nodes[1], &nodes[2]], &log);
    assert!(image == back);
}
