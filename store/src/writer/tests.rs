//! Unit tests of the writer on this node's own engine (a 1-replica volume,
//! no daemon): attach, the data path (unaligned writes, discards, many
//! writers at once), and control operations behind the I/O gate.

use std::sync::Arc;

use super::{Keys, Writer};
use crate::engine::Engine;
use crate::io::VolumeIo;
use crate::meta::ReplicaAddr;
use crate::transport::TcpConnector;
use crate::{BLOCK_SIZE, EXTENT_SIZE};

fn local_writer(dir: &std::path::Path, size: u64) -> Arc<Writer> {
    let engine = Arc::new(Engine::open("n1", &[dir.to_path_buf()]).unwrap());
    let me = ReplicaAddr {
        node: "n1".into(),
        addr: "127.0.0.1:1".into(),
    };
    engine
        .create_volume("v", size, vec![me.clone()], 1, None)
        .unwrap();
    Writer::attach(
        "v",
        vec![me],
        engine,
        Arc::new(TcpConnector::default()),
        false,
        Keys::default(),
    )
    .unwrap()
}

#[test]
fn attach_raises_the_epoch_and_io_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), 4 * EXTENT_SIZE);
    assert_eq!(w.epoch, 2);
    assert_eq!(w.engine.info("v").unwrap().epoch, 2);
    // Its only replica is this node's engine.
    assert!(w.writes_stay_local());
    // Unaligned, across blocks: read-modify-write at both ends.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    w.write_at(&data, 1000).unwrap();
    let mut back = vec![0u8; data.len()];
    w.read_at(&mut back, 1000).unwrap();
    assert_eq!(back, data);
    let mut edge = vec![0xffu8; 1000];
    w.read_at(&mut edge, 0).unwrap();
    assert!(edge.iter().all(|b| *b == 0));
    w.flush().unwrap();
    // A discard with unaligned edges zeroes exactly its range.
    w.discard(1500, 3 * BLOCK_SIZE).unwrap();
    let mut all = vec![0u8; 12_000];
    w.read_at(&mut all, 0).unwrap();
    for (i, b) in all.iter().enumerate() {
        let off = i as u64;
        let want = if (1500..1500 + 3 * BLOCK_SIZE).contains(&off) || !(1000..11_000).contains(&off)
        {
            0
        } else {
            data[i - 1000]
        };
        assert_eq!(*b, want, "byte {i}");
    }
    assert!(w.write_at(&[0u8; 1], 4 * EXTENT_SIZE).is_err());
}

#[test]
fn sub_block_writes_of_many_threads_to_one_block_lose_nothing() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), EXTENT_SIZE);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let w = &w;
            s.spawn(move || {
                for k in 0..20u8 {
                    // Thread t owns bytes [512t, 512t + 512) of block 0.
                    w.write_at(&[k.wrapping_add(t as u8); 512], t * 512)
                        .unwrap();
                }
            });
        }
    });
    let mut blk = vec![0u8; 4096];
    w.read_at(&mut blk, 0).unwrap();
    for t in 0..8usize {
        let want = 19u8.wrapping_add(t as u8);
        assert!(
            blk[t * 512..(t + 1) * 512].iter().all(|b| *b == want),
            "sector {t}"
        );
    }
}

#[test]
fn control_operations_wait_for_writes_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), 4 * EXTENT_SIZE);
    std::thread::scope(|s| {
        let w2 = &w;
        let writer = s.spawn(move || {
            for i in 0..200u64 {
                w2.write_at(&[i as u8; 4096], (i % 64) * 4096).unwrap();
            }
        });
        w.snapshot("s1").unwrap();
        w.resize(8 * EXTENT_SIZE).unwrap();
        writer.join().unwrap();
    });
    assert_eq!(w.size().unwrap(), 8 * EXTENT_SIZE);
    w.write_at(&[7u8; 4096], 7 * EXTENT_SIZE).unwrap();
    assert_eq!(w.status().snapshots, vec!["s1".to_string()]);
}

/// `write_vec` hands whole blocks to the replicas in the caller's buffer
/// and falls back to `write_at` for anything else (`read_vec` the same for
/// reads); either way what reads back is what was written, and a write
/// past the end changes nothing.
#[test]
fn owned_buffers_are_written_whole_or_through_the_byte_path() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), 4 * EXTENT_SIZE);
    let pattern = |seed: u32, len: usize| -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 253) as u8)
            .collect()
    };
    // Whole blocks across an extent boundary: the owned path.
    let a = pattern(1, 6 * BLOCK_SIZE as usize);
    let at = EXTENT_SIZE - 2 * BLOCK_SIZE;
    w.write_vec(a.clone().into(), at).unwrap();
    // Unaligned, inside a block the first write covers: the byte path
    // (read-modify-write), which must keep the rest of that block.
    let b = pattern(2, 100);
    w.write_vec(b.clone().into(), at + 10).unwrap();
    let mut want = a.clone();
    want[10..110].copy_from_slice(&b);
    let mut back = vec![0u8; want.len()];
    w.read_at(&mut back, at).unwrap();
    assert_eq!(back, want);
    // `read_vec` gives the same, whole blocks (its own buffer) or not.
    assert_eq!(w.read_vec(at, want.len()).unwrap(), want);
    assert_eq!(w.read_vec(at + 10, 100).unwrap(), b);
    assert!(w
        .read_vec(4 * EXTENT_SIZE - BLOCK_SIZE, 2 * BLOCK_SIZE as usize)
        .is_err());
    assert!(w.read_vec(0, 0).unwrap().is_empty());
    // Past the end: refused, and the last block is untouched.
    let last = 4 * EXTENT_SIZE - BLOCK_SIZE;
    assert!(w
        .write_vec(vec![7u8; 2 * BLOCK_SIZE as usize].into(), last)
        .is_err());
    let mut tail = vec![0xffu8; BLOCK_SIZE as usize];
    w.read_at(&mut tail, last).unwrap();
    assert!(tail.iter().all(|x| *x == 0));
    // Nothing to write is nothing written.
    w.write_vec(Vec::new().into(), 0).unwrap();
    // And it all survives a flush and a fresh read from the engine.
    w.flush().unwrap();
    let out = w.engine.read("v", at, want.len() as u64).unwrap();
    assert_eq!(out.data, want);
}

/// Two replicas on engines of their own, reached through real sockets
/// where each request is served by the replica code of the daemon
/// ([`crate::replica::handle`]); a replica named in `short_reads` answers
/// every read with its last 512 bytes missing, as a broken or hostile
/// replica might.
struct TwoReplicas {
    engines: Vec<(String, Arc<Engine>)>,
    short_reads: std::sync::Mutex<Option<String>>,
    /// `WriteBatch` requests served.
    batches: Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::transport::Connector for TwoReplicas {
    fn connect(
        &self,
        node: &str,
        _addr: &str,
    ) -> crate::error::Result<Box<dyn crate::transport::Conn>> {
        use crate::proto::{self, Kind, Request, Response};
        let engine = self
            .engines
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, e)| e.clone())
            .ok_or_else(|| crate::error::Error::Unavailable(format!("no node {node}")))?;
        let short = self.short_reads.lock().unwrap().as_deref() == Some(node);
        let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
        let batches = self.batches.clone();
        std::thread::spawn(move || {
            while let Ok(Some((Kind::Request, body))) = proto::read_frame(&mut b) {
                let req: Request = proto::decode(&body).unwrap();
                if matches!(req, Request::WriteBatch { .. }) {
                    batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let mut resp = crate::replica::handle(&engine, &TcpConnector::default(), &req);
                if let (true, Response::Read(out)) = (short, &mut resp) {
                    let keep = out.data.len().saturating_sub(512);
                    out.data.truncate(keep);
                }
                if proto::send(&mut b, Kind::Response, &resp).is_err() {
                    return;
                }
            }
        });
        Ok(Box::new(a))
    }
}

/// A writer on node n1 of a volume whose two replicas are on n2 and n3
/// (engines of their own, reached through [`TwoReplicas`]).
fn two_remote_replicas() -> (Vec<tempfile::TempDir>, Arc<TwoReplicas>, Arc<Writer>) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let addrs: Vec<ReplicaAddr> = ["n2", "n3"]
        .iter()
        .map(|n| ReplicaAddr {
            node: n.to_string(),
            addr: "127.0.0.1:1".into(),
        })
        .collect();
    let mut engines = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let e = Arc::new(Engine::open(&a.node, &[dirs[i + 1].path().to_path_buf()]).unwrap());
        e.create_volume("v", 4 * EXTENT_SIZE, addrs.clone(), 1, None)
            .unwrap();
        engines.push((a.node.clone(), e));
    }
    let replicas = Arc::new(TwoReplicas {
        engines,
        short_reads: std::sync::Mutex::new(None),
        batches: Arc::default(),
    });
    // The writer's own node holds no replica: both reads go over sockets,
    // n2 first.
    let own = Arc::new(Engine::open("n1", &[dirs[0].path().to_path_buf()]).unwrap());
    let w = Writer::attach("v", addrs, own, replicas.clone(), false, Keys::default()).unwrap();
    (dirs, replicas, w)
}

/// A replica whose read answer is shorter (or longer) than asked is not
/// believed: the read goes to the next replica, and the liar is marked
/// stale, so that reads stop going to it and the survivors record what it
/// misses from then on.
#[test]
fn a_read_answered_with_the_wrong_length_goes_to_the_next_replica() {
    let (_dirs, replicas, w) = two_remote_replicas();
    let data: Vec<u8> = (0..2 * BLOCK_SIZE as u32)
        .map(|i| (i % 241) as u8)
        .collect();
    w.write_at(&data, BLOCK_SIZE).unwrap();
    // Links opened from now on lead to an n2 that answers short.
    *replicas.short_reads.lock().unwrap() = Some("n2".into());
    w.lock().peers[0].drop_link();
    // In a thread with a deadline: believing the short answer once made
    // read_at wait forever for the bytes missing.
    let (done, answer) = std::sync::mpsc::channel();
    let w2 = w.clone();
    std::thread::spawn(move || {
        let mut back = vec![0u8; 2 * BLOCK_SIZE as usize];
        let r = w2.read_at(&mut back, BLOCK_SIZE).map(|()| back);
        let _ = done.send(r);
    });
    let back = answer
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the read never returned")
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(w.lock().peers[0].state, super::PeerState::Stale);
    assert_eq!(w.lock().peers[1].state, super::PeerState::InSync);
    // The owned-buffer read takes the same path, now straight to n3.
    assert_eq!(w.read_vec(BLOCK_SIZE, data.len()).unwrap(), data);
    // Writes go on without n2; n3 records that n2 misses them.
    w.write_at(&[9u8; BLOCK_SIZE as usize], 0).unwrap();
    let n3 = &replicas.engines[1].1;
    assert_eq!(n3.read("v", 0, BLOCK_SIZE).unwrap().data, vec![9u8; 4096]);
    assert!(!n3.info("v").unwrap().stale.get("n2").unwrap().is_empty());
}

/// Many writers at once to two remote replicas: the writes waiting while
/// others are on the wire go out together (`WriteBatch`), and at the end
/// both replicas hold exactly what every writer wrote.
#[test]
fn concurrent_writes_to_remote_replicas_go_in_batches_and_land_on_both() {
    let (_dirs, replicas, w) = two_remote_replicas();
    let block = |t: u64, i: u64| -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|k| (k.wrapping_mul(7) ^ (t * 131 + i)) as u8)
            .collect()
    };
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (w, block) = (&w, &block);
            s.spawn(move || {
                for i in 0..32u64 {
                    // Thread t owns blocks t, t + 8, t + 16, ...
                    w.write_vec(block(t, i).into(), (i * 8 + t) * BLOCK_SIZE)
                        .unwrap();
                }
            });
        }
    });
    w.flush().unwrap();
    assert!(replicas.batches.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let want: Vec<u8> = (0..256u64).flat_map(|b| block(b % 8, b / 8)).collect();
    for (node, e) in &replicas.engines {
        let got = e.read("v", 0, 256 * BLOCK_SIZE).unwrap();
        assert!(got.bad_blocks.is_empty());
        assert!(got.data == want, "{node} differs from what was written");
    }
    assert_eq!(w.read_vec(0, want.len()).unwrap(), want);
}

/// Reads of a batch come from this node's replica, submitted together;
/// a range with a block that fails its checksum there is read again the
/// ordinary way and the block repaired from the other replica; ranges the
/// batch cannot take (not whole blocks, past the end) get what a read of
/// their own gets.
#[test]
fn a_batch_of_reads_is_read_here_and_a_bad_block_repaired_from_the_other_replica() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let addrs: Vec<ReplicaAddr> = ["n1", "n2"]
        .iter()
        .map(|n| ReplicaAddr {
            node: n.to_string(),
            addr: "127.0.0.1:1".into(),
        })
        .collect();
    let engines: Vec<Arc<Engine>> = addrs
        .iter()
        .zip(&dirs)
        .map(|(a, d)| {
            let e = Arc::new(Engine::open(&a.node, &[d.path().to_path_buf()]).unwrap());
            e.create_volume("v", 4 * EXTENT_SIZE, addrs.clone(), 1, None)
                .unwrap();
            e
        })
        .collect();
    let replicas = Arc::new(TwoReplicas {
        engines: vec![("n2".into(), engines[1].clone())],
        short_reads: std::sync::Mutex::new(None),
        batches: Arc::default(),
    });
    let w = Writer::attach(
        "v",
        addrs,
        engines[0].clone(),
        replicas,
        false,
        Keys::default(),
    )
    .unwrap();
    assert!(w.reads_stay_local());
    let data: Vec<u8> = (0..2 * EXTENT_SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (i, c) in data.chunks(crate::MAX_IO as usize).enumerate() {
        w.write_at(c, i as u64 * crate::MAX_IO).unwrap();
    }
    // Block 300 goes bad on this node's replica only.
    let (path, at) = engines[0].block_location("v", 300).unwrap().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"rot", at + 9).unwrap();
    drop(f);
    let b = BLOCK_SIZE as usize;
    let mut reads: Vec<(u64, usize)> = (0..40u64).map(|i| (i * 37 % 500 * BLOCK_SIZE, b)).collect();
    reads.push((298 * BLOCK_SIZE, 4 * b));
    reads.push((EXTENT_SIZE - BLOCK_SIZE, 3 * b));
    let whole = reads.len();
    let got = w.read_batch(&reads);
    let want = |o: u64, l: usize| data[o as usize..o as usize + l].to_vec();
    for (&(o, l), g) in reads.iter().zip(&got) {
        assert!(*g.as_ref().unwrap() == want(o, l), "read at {o}+{l}");
    }
    // Repaired here: the engine alone now reads it clean.
    let here = engines[0].read("v", 300 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
    assert!(here.bad_blocks.is_empty() && here.data == want(300 * BLOCK_SIZE, b));
    assert!(
        engines[0]
            .metrics
            .checksum_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Ranges not whole blocks, and past the end, in one batch.
    reads.truncate(whole);
    reads.extend([(5, 10), (4 * EXTENT_SIZE, b)]);
    let got = w.read_batch(&reads);
    assert_eq!(*got[whole].as_ref().unwrap(), want(5, 10));
    assert!(got[whole + 1].is_err());
}

/// Reads taken in batches while writers overwrite the same ranges: each
/// read sees each write whole or not at all (the batch holds its tickets
/// until it is done), and nothing deadlocks.
#[test]
fn batched_reads_see_concurrent_writes_whole() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), 4 * EXTENT_SIZE);
    let slot = 4 * BLOCK_SIZE;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (w, stop) = (&w, &stop);
            s.spawn(move || {
                let mut gen = 1u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Thread t rewrites slots t, t + 4, ... with one value.
                    for k in 0..8u64 {
                        let buf = vec![gen; slot as usize];
                        w.write_vec(buf.into(), (k * 4 + t) * slot).unwrap();
                    }
                    gen = gen.wrapping_add(1).max(1);
                }
            });
        }
        for _ in 0..200 {
            let reads: Vec<(u64, usize)> = (0..32u64).map(|k| (k * slot, slot as usize)).collect();
            for (i, r) in w.read_batch(&reads).into_iter().enumerate() {
                let r = r.unwrap();
                assert!(r.iter().all(|x| *x == r[0]), "slot {i} torn");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// A range of a batch that the local replica cannot give sound (a block
/// failing its checksum) is read again the ordinary way, which calls into
/// the engine; flushes that free slots meanwhile take the engine's lock
/// and wait for every batch's read guard. The second read comes after the
/// batch lets its guard go, so neither waits for the other for ever.
#[test]
fn a_batch_read_again_and_slot_freeing_flushes_do_not_deadlock() {
    let d = tempfile::tempdir().unwrap();
    let w = local_writer(d.path(), 4 * EXTENT_SIZE);
    let data = vec![7u8; 2 * EXTENT_SIZE as usize];
    w.write_at(&data, 0).unwrap();
    // Block 5 rots on the only replica: every batch holding it reads it
    // again after the batch (and fails: there is no good copy).
    let (path, at) = w.engine.block_location("v", 5).unwrap().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"rot", at + 9).unwrap();
    drop(f);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (w2, stop2) = (&w, &stop);
        // Extent 3 allocated, discarded and flushed over and over: each
        // flush frees its slot.
        s.spawn(move || {
            let one = vec![1u8; BLOCK_SIZE as usize];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                w2.write_at(&one, 3 * EXTENT_SIZE).unwrap();
                w2.flush().unwrap();
                w2.discard(3 * EXTENT_SIZE, EXTENT_SIZE).unwrap();
                w2.flush().unwrap();
            }
        });
        let w3 = &w;
        s.spawn(move || {
            let b = BLOCK_SIZE as usize;
            let reads: Vec<(u64, usize)> = (0..32u64).map(|k| (k * BLOCK_SIZE, b)).collect();
            for _ in 0..300 {
                let got = w3.read_batch(&reads);
                for (k, g) in got.iter().enumerate() {
                    match k {
                        5 => assert!(g.is_err(), "the rotten block read as sound"),
                        _ => assert!(g.as_ref().unwrap().iter().all(|x| *x == 7), "block {k}"),
                    }
                }
            }
            tx.send(()).unwrap();
        });
        if rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .is_err()
        {
            // The threads cannot be joined: end the test binary.
            eprintln!("batch reads and flushes deadlocked");
            std::process::exit(101);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// An encrypted volume's batch of reads: each range comes back decrypted
/// (after the batch, under the writer's lock), equal to what was written;
/// the replica holds other bytes.
#[test]
fn an_encrypted_batch_reads_back_plaintext() {
    use crate::crypt::VolumeKey;
    let d = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open("n1", &[d.path().to_path_buf()]).unwrap());
    let me = ReplicaAddr {
        node: "n1".into(),
        addr: "127.0.0.1:1".into(),
    };
    let key = VolumeKey::random().unwrap();
    let rec = crate::types::CryptRec {
        key_check: crate::crypt::key_check(&key),
        rekey: None,
    };
    engine
        .create_volume("v", 2 * EXTENT_SIZE, vec![me.clone()], 1, Some(rec))
        .unwrap();
    let w = Writer::attach(
        "v",
        vec![me],
        engine.clone(),
        Arc::new(TcpConnector::default()),
        false,
        Keys {
            key: Some(key),
            next_key: None,
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..EXTENT_SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    w.write_at(&data, 0).unwrap();
    let b = BLOCK_SIZE as usize;
    let reads: Vec<(u64, usize)> = (0..48u64)
        .map(|k| (k * 5 % 250 * BLOCK_SIZE, 2 * b))
        .collect();
    let got = w.read_batch(&reads);
    for (&(o, l), g) in reads.iter().zip(&got) {
        let o = o as usize;
        assert!(g.as_ref().unwrap()[..] == data[o..o + l], "read at {o}+{l}");
    }
    let raw = engine.read("v", 0, 2 * BLOCK_SIZE).unwrap();
    assert!(raw.data[..] != data[..2 * b], "plaintext on the replica");
}
