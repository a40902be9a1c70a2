//! Crash consistency: the writer daemon is killed with SIGKILL at random
//! moments during writes and flushes, over and over; after each restart
//! every acknowledged write reads back, both replicas agree, and nothing
//! fails its checksum.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kiln_store::{VolumeClient, VolumeIo};

const BLOCKS: u64 = 512; // 2 MiB hot area, so blocks are rewritten often
const ROUNDS: u64 = 50;

fn block_data(seq: u64, i: u64) -> Vec<u8> {
    pattern(seq * 16 + i, 4096)
}

#[derive(Default)]
struct Model {
    /// block → sequence number of its last acknowledged write
    acked: HashMap<u64, u64>,
    /// block → sequence number of a write sent but not acknowledged
    pending: HashMap<u64, u64>,
}

#[test]
fn acknowledged_writes_survive_repeated_kill_9() {
    let t = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(t.path(), "n1", 1);
    let n2 = Node::new(t.path(), "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    let model = Arc::new(Mutex::new(Model::default()));
    let mut rng = Rng(0x5eed);
    let mut seq = 1u64;
    let mut acked_total = 0usize;
    for round in 0..ROUNDS {
        if round > 0 {
            n1.start();
            n1.cli_ok(&["attach", "vol"]);
            // Verify every block against the model.
            let v = VolumeClient::open(&n1.socket, "vol").unwrap();
            let mut all = vec![0u8; (BLOCKS * 4096) as usize];
            v.read_at(&mut all, 0)
                .unwrap_or_else(|e| panic!("round {round}: read failed: {e}"));
            let m = model.lock().unwrap();
            for b in 0..BLOCKS {
                let got = &all[(b * 4096) as usize..((b + 1) * 4096) as usize];
                let ok_acked = match m.acked.get(&b) {
                    Some(s) => got == block_data(*s, b).as_slice(),
                    None => got.iter().all(|x| *x == 0),
                };
                let ok_pending = m
                    .pending
                    .get(&b)
                    .is_some_and(|s| got == block_data(*s, b).as_slice());
                assert!(
                    ok_acked || ok_pending,
                    "round {round}: block {b} lost its acknowledged write (acked {:?}, pending {:?})",
                    m.acked.get(&b),
                    m.pending.get(&b)
                );
            }
            acked_total = m.acked.len();
            drop(m);
            // Both replicas hold the same data after the new writer's
            // consistency pass.
            assert!(
                n1.replica_read_all("vol", BLOCKS * 4096)
                    == n2.replica_read_all("vol", BLOCKS * 4096),
                "round {round}: replicas diverge"
            );
            // What was in flight is now settled: the data read is the truth.
            let mut m = model.lock().unwrap();
            let pending: Vec<(u64, u64)> = m.pending.drain().collect();
            for (b, s) in pending {
                let got = &all[(b * 4096) as usize..((b + 1) * 4096) as usize];
                if got == block_data(s, b).as_slice() {
                    m.acked.insert(b, s);
                }
            }
        }
        // Write (and sometimes flush) until killed.
        let v = VolumeClient::open(&n1.socket, "vol").unwrap();
        let m = model.clone();
        let start_seq = seq;
        let mut wrng = Rng(rng.next() | 1);
        let writer = std::thread::spawn(move || {
            let mut s = start_seq;
            loop {
                let n = 1 + wrng.below(4);
                let b0 = wrng.below(BLOCKS - n);
                let mut data = Vec::new();
                {
                    let mut m = m.lock().unwrap();
                    for i in 0..n {
                        data.extend(block_data(s, b0 + i));
                        m.pending.insert(b0 + i, s);
                    }
                }
                if v.write_at(&data, b0 * 4096).is_err() {
                    return s;
                }
                {
                    let mut m = m.lock().unwrap();
                    for i in 0..n {
                        m.acked.insert(b0 + i, s);
                        m.pending.remove(&(b0 + i));
                    }
                }
                s += 1;
                if s % 4 == 0 && v.flush().is_err() {
                    return s;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(5 + rng.below(40)));
        n1.kill9();
        seq = writer.join().unwrap() + 1;
    }
    assert!(
        acked_total > 100,
        "too few writes were acknowledged: {acked_total}"
    );
}
