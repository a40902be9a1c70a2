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
    w.write_vec(a.clone(), at).unwrap();
    // Unaligned, inside a block the first write covers: the byte path
    // (read-modify-write), which must keep the rest of that block.
    let b = pattern(2, 100);
    w.write_vec(b.clone(), at + 10).unwrap();
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
        .write_vec(vec![7u8; 2 * BLOCK_SIZE as usize], last)
        .is_err());
    let mut tail = vec![0xffu8; BLOCK_SIZE as usize];
    w.read_at(&mut tail, last).unwrap();
    assert!(tail.iter().all(|x| *x == 0));
    // Nothing to write is nothing written.
    w.write_vec(Vec::new(), 0).unwrap();
    // And it all survives a flush and a fresh read from the engine.
    w.flush().unwrap();
    let out = w.engine.read("v", at, want.len() as u64).unwrap();
    assert_eq!(out.data, want);
}
