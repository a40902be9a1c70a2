//! Unit tests of the engine.

use super::*;
use crate::checksum::{block_crc, Entry};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

fn engine(dirs: &[PathBuf]) -> Engine {
    Engine::open("n1", dirs).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn flip(e: &Engine, vol: &str, block: u64, at: u64) {
    let (path, off) = e.block_location(vol, block).unwrap().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off + at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, off + at).unwrap();
}

#[test]
fn write_read_roundtrip_across_extents_and_disks() {
    let t = tempfile::tempdir().unwrap();
    let dirs = vec![t.path().join("d1"), t.path().join("d2")];
    let e = engine(&dirs);
    e.create_volume("v", 8 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let data = pattern(1, 3 * EXTENT_SIZE as usize);
    // Straddles extents 0..=3 (not aligned on an extent).
    e.write("v", 1, EXTENT_SIZE / 2, &data, &[]).unwrap();
    let out = e.read("v", EXTENT_SIZE / 2, data.len() as u64).unwrap();
    assert!(out.bad_blocks.is_empty());
    assert_eq!(out.data, data);
    // Extents spread over both disks.
    for d in &dirs {
        assert!(slab_space(d).unwrap() > 0);
    }
    // Survives reopening.
    drop(e);
    let e = engine(&dirs);
    assert_eq!(
        e.read("v", EXTENT_SIZE / 2, data.len() as u64)
            .unwrap()
            .data,
        data
    );
}

#[test]
fn thin_provisioning_allocates_on_first_write() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 1 << 30, vec![], 1, None).unwrap();
    assert_eq!(e.info("v").unwrap().allocated_bytes, 0);
    let out = e.read("v", 5 * EXTENT_SIZE, 8192).unwrap();
    assert!(out.data.iter().all(|b| *b == 0));
    e.write("v", 1, 5 * EXTENT_SIZE + 4096, &pattern(2, 4096), &[])
        .unwrap();
    assert_eq!(e.info("v").unwrap().allocated_bytes, EXTENT_SIZE);
    assert_eq!(e.extent_count(), 1);
}

#[test]
fn rejects_bad_ranges_and_epochs() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", EXTENT_SIZE, vec![], 3, None).unwrap();
    assert!(matches!(
        e.write("v", 3, 100, &[0u8; 4096], &[]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        e.write("v", 3, EXTENT_SIZE, &[0u8; 4096], &[]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        e.write("v", 2, 0, &[0u8; 4096], &[]),
        Err(Error::Fenced { .. })
    ));
    assert!(matches!(e.set_epoch("v", 2), Err(Error::Fenced { .. })));
    // The epoch it has is taken: a second writer choosing it is refused.
    assert!(matches!(
        e.set_epoch("v", 3),
        Err(Error::Fenced {
            request: 3,
            current: 3
        })
    ));
    e.set_epoch("v", 4).unwrap();
    assert!(matches!(
        e.write("v", 3, 0, &[0u8; 4096], &[]),
        Err(Error::Fenced { .. })
    ));
    assert!(e.write("v", 4, 0, &[1u8; 4096], &[]).is_ok());
    assert!(e
        .create_volume("../x", EXTENT_SIZE, vec![], 1, None)
        .is_err());
}

#[test]
fn checksum_mismatch_is_reported_not_returned() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", EXTENT_SIZE, vec![], 1, None).unwrap();
    e.write("v", 1, 0, &pattern(3, 16384), &[]).unwrap();
    flip(&e, "v", 2, 100);
    let out = e.read("v", 0, 16384).unwrap();
    assert_eq!(out.bad_blocks, vec![2]);
    assert!(out.data[8192..12288].iter().all(|b| *b == 0));
    assert_eq!(out.data[..8192], pattern(3, 16384)[..8192]);
    assert_eq!(e.metrics.checksum_errors.load(Ordering::Relaxed), 1);
}

#[test]
fn interrupted_write_reads_old_or_new() {
    // Simulate kill -9 after step 1 (sidecar has (new, old)) and after
    // step 2 (data written, sidecar still (new, old)).
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", EXTENT_SIZE, vec![], 1, None).unwrap();
    let old = pattern(4, 4096);
    let new = pattern(5, 4096);
    e.write("v", 1, 0, &old, &[]).unwrap();
    let (path, _) = e.block_location("v", 0).unwrap().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut side = [0u8; ENTRY_SIZE];
    Entry {
        current: block_crc(&new),
        previous: block_crc(&old),
    }
    .encode(&mut side);
    f.write_all_at(&side, EXTENT_SIZE).unwrap();
    assert_eq!(e.read("v", 0, 4096).unwrap().data, old);
    f.write_all_at(&new, 0).unwrap();
    assert_eq!(e.read("v", 0, 4096).unwrap().data, new);
    // A later write after such a crash keeps verifying.
    let newer = pattern(6, 4096);
    e.write("v", 1, 0, &newer, &[]).unwrap();
    let out = e.read("v", 0, 4096).unwrap();
    assert!(out.bad_blocks.is_empty());
    assert_eq!(out.data, newer);
}

#[test]
fn snapshot_clone_cow_and_delete_reclaims() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let a = pattern(7, 2 * EXTENT_SIZE as usize);
    e.write("v", 1, 0, &a, &[]).unwrap();
    assert_eq!(e.extent_count(), 2);
    e.snapshot("v", "s1").unwrap();
    assert_eq!(e.extent_count(), 2, "a snapshot copies nothing");
    let b = pattern(8, 4096);
    e.write("v", 1, 0, &b, &[]).unwrap();
    assert_eq!(
        e.extent_count(),
        3,
        "first write to a shared extent copies it"
    );
    e.clone_volume("v", "s1", "c", 1).unwrap();
    assert_eq!(e.extent_count(), 3, "a clone copies nothing");
    assert_eq!(e.read("c", 0, a.len() as u64).unwrap().data, a);
    let c = pattern(9, 4096);
    e.write("c", 1, EXTENT_SIZE, &c, &[]).unwrap();
    assert_eq!(e.read("c", EXTENT_SIZE, 4096).unwrap().data, c);
    let v = e.read("v", 0, a.len() as u64).unwrap().data;
    assert_eq!(v[..4096], b[..]);
    assert_eq!(
        v[4096..],
        a[4096..],
        "writes to the clone leave the base alone"
    );
    // The clone still references the snapshot's extent 0; extent 1 of
    // the snapshot is shared with v.
    e.delete_volume("c").unwrap();
    let before = e.extent_count();
    e.delete_snapshot("v", "s1").unwrap();
    assert!(
        e.extent_count() < before,
        "deleting the snapshot frees extents"
    );
    assert_eq!(e.extent_count(), 2);
    let space = slab_space(t.path()).unwrap();
    assert!(
        space <= 2 * SLOT_SIZE,
        "freed extents' space is given back: {space} bytes still held"
    );
    e.delete_volume("v").unwrap();
    assert_eq!(e.extent_count(), 0);
    assert_eq!(slab_space(t.path()).unwrap(), 0);
}

#[test]
fn torn_blocks_of_unflushed_regions_are_adopted() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let data = pattern(5, 2 * EXTENT_SIZE as usize);
    e.write("v", 1, 0, &data, &[]).unwrap();
    // Block 3 torn: its data no longer matches its checksum.
    flip(&e, "v", 3, 10);
    assert_eq!(e.read("v", 0, 4 * BLOCK_SIZE).unwrap().bad_blocks, vec![3]);
    assert!(e.adopt_torn("v", 2, &[0]).is_err(), "checks the epoch");
    assert_eq!(e.adopt_torn("v", 1, &[0, 1, 2]).unwrap(), 1);
    let out = e.read("v", 0, 4 * BLOCK_SIZE).unwrap();
    assert!(out.bad_blocks.is_empty());
    let mut want = data[..4 * BLOCK_SIZE as usize].to_vec();
    want[3 * BLOCK_SIZE as usize + 10] ^= 0x5a;
    assert_eq!(out.data, want, "the block keeps what it holds");
}

#[test]
fn reused_and_orphaned_slots_read_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let dirs = vec![t.path().to_path_buf()];
    let e = engine(&dirs);
    e.create_volume("a", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let full = pattern(3, EXTENT_SIZE as usize);
    e.write("a", 1, 0, &full, &[]).unwrap();
    e.flush(None).unwrap();
    // A slot freed since the last flush is not handed out (its clearing
    // is not durable yet); after the flush it is, and reads as zeros but
    // for what its new owner writes.
    e.delete_volume("a").unwrap();
    e.create_volume("b", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let one = pattern(4, BLOCK_SIZE as usize);
    e.write("b", 1, BLOCK_SIZE, &one, &[]).unwrap();
    let (_, off) = e.block_location("b", 1).unwrap().unwrap();
    assert_eq!(off, SLOT_SIZE + BLOCK_SIZE, "slot 0 is not reused yet");
    e.flush(None).unwrap();
    e.write("b", 1, EXTENT_SIZE + BLOCK_SIZE, &one, &[])
        .unwrap();
    let (path, off) = e
        .block_location("b", BLOCKS_PER_EXTENT + 1)
        .unwrap()
        .unwrap();
    assert_eq!(off, BLOCK_SIZE, "slot 0 is reused after the flush");
    let mut want = vec![0u8; EXTENT_SIZE as usize];
    want[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize].copy_from_slice(&one);
    let out = e.read("b", EXTENT_SIZE, EXTENT_SIZE).unwrap();
    assert!(out.bad_blocks.is_empty() && out.data == want);
    e.flush(None).unwrap();
    drop(e);
    // A slot written by an allocation that never got committed (a crash
    // between the data and the metadata) holds a valid-looking extent;
    // reopening clears it before it is handed out.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut slot0 = vec![0u8; SLOT_SIZE as usize];
    f.read_exact_at(&mut slot0, 0).unwrap();
    f.write_all_at(&slot0, 2 * SLOT_SIZE).unwrap();
    let e = engine(&dirs);
    e.write("b", 1, 2 * EXTENT_SIZE, &one, &[]).unwrap();
    let (_, off) = e
        .block_location("b", 2 * BLOCKS_PER_EXTENT)
        .unwrap()
        .unwrap();
    assert_eq!(off, 2 * SLOT_SIZE, "slot 2 is handed out");
    let out = e.read("b", 2 * EXTENT_SIZE, EXTENT_SIZE).unwrap();
    assert!(out.bad_blocks.is_empty());
    assert!(out.data[..BLOCK_SIZE as usize] == one[..]);
    assert!(out.data[BLOCK_SIZE as usize..].iter().all(|b| *b == 0));
}

#[test]
fn scrub_finds_flip_and_repair_fixes_it() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 2 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let data = pattern(10, 2 * EXTENT_SIZE as usize);
    e.write("v", 1, 0, &data, &[]).unwrap();
    assert!(e.scrub("v", |_, _| {}).unwrap().is_empty());
    flip(&e, "v", 300, 7);
    let bad = e.scrub("v", |_, _| {}).unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].block, 300);
    let good = &data[300 * 4096..301 * 4096];
    assert!(e.repair_block("v", bad[0], good).unwrap());
    assert!(e.scrub("v", |_, _| {}).unwrap().is_empty());
    assert_eq!(e.read("v", 300 * 4096, 4096).unwrap().data, good);
    // A stale repair (the block was rewritten since) is skipped.
    flip(&e, "v", 300, 9);
    let bad = e.scrub("v", |_, _| {}).unwrap();
    let newer = pattern(11, 4096);
    e.write("v", 1, 300 * 4096, &newer, &[]).unwrap();
    assert!(!e.repair_block("v", bad[0], good).unwrap());
    assert_eq!(e.read("v", 300 * 4096, 4096).unwrap().data, newer);
}

#[test]
fn activity_and_stale_maps_track_regions() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 8 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    e.write("v", 1, 3 * EXTENT_SIZE, &[1u8; 4096], &["n2".into()])
        .unwrap();
    let i = e.info("v").unwrap();
    assert_eq!(i.activity[&1], BTreeSet::from([3]));
    assert_eq!(i.stale["n2"], BTreeSet::from([3]));
    e.flush(Some(("v", 1))).unwrap();
    let i = e.info("v").unwrap();
    assert!(
        i.activity.is_empty(),
        "a flush checkpoints the activity log"
    );
    assert_eq!(
        i.stale["n2"],
        BTreeSet::from([3]),
        "stale maps survive flushes"
    );
    e.discard("v", 1, 3 * EXTENT_SIZE, EXTENT_SIZE, &[])
        .unwrap();
    assert_eq!(e.info("v").unwrap().allocated_bytes, 0);
}

fn rec_with_log(size: u64, epoch: u64, logged: &[u64]) -> VolumeRec {
    VolumeRec {
        id: 1,
        size,
        map: 1,
        epoch,
        replicas: Vec::new(),
        snapshots: BTreeMap::new(),
        activity: [(epoch, logged.iter().copied().collect())].into(),
        stale: BTreeMap::new(),
        crypt: None,
    }
}

#[test]
fn a_run_written_a_little_out_of_order_is_still_logged_ahead() {
    let rec = rec_with_log(1 << 30, 3, &[10]);
    // Right after the run: the next LOG_AHEAD regions.
    let a = Engine::log_ahead(&rec, 3, 11, 11);
    assert_eq!(a.first(), Some(&12));
    assert_eq!(a.len() as u64, LOG_AHEAD);
    // A few regions past its end (a concurrent write took the one
    // between): the gap is logged too.
    let b = Engine::log_ahead(&rec, 3, 13, 13);
    assert!(b.contains(&11) && b.contains(&12) && !b.contains(&13) && b.contains(&14));
    // Far from any logged run, or already logged: nothing ahead.
    assert!(Engine::log_ahead(&rec, 3, 10 + LOG_BEHIND + 1, 10 + LOG_BEHIND + 1).is_empty());
    assert!(Engine::log_ahead(&rec, 3, 10, 10).is_empty());
    assert!(Engine::log_ahead(&rec, 4, 11, 11).is_empty());
}

#[test]
fn a_write_changes_the_record_only_when_something_is_new() {
    let mut rec = rec_with_log(1 << 30, 3, &[1, 2]);
    rec.stale.insert("n2".into(), [1].into());
    assert!(!Engine::notes_missing(&rec, 3, &[1, 2], &[]));
    assert!(!Engine::notes_missing(&rec, 3, &[1], &["n2".to_string()]));
    assert!(Engine::notes_missing(&rec, 3, &[2], &["n2".to_string()]));
    assert!(Engine::notes_missing(&rec, 3, &[3], &[]));
    assert!(Engine::notes_missing(&rec, 4, &[1], &[]));
}

#[test]
fn a_flush_keeps_regions_whose_writes_are_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let e = engine(&[d.path().to_path_buf()]);
    e.create_volume("v", 2048 << 20, vec![], 1, None).unwrap();
    // More hot regions than the log keeps, so the flush prunes.
    let limit = ACTIVITY_LOG_LIMIT as u64;
    for r in 0..=limit {
        e.write("v", 1, r * EXTENT_SIZE, &[1u8; 4096], &[]).unwrap();
    }
    // A write of region 3 "in flight" across the flush.
    e.lock().writing.entry("v".into()).or_default().insert(3, 1);
    e.flush_keep_hot("v", 1).unwrap();
    e.flush_keep_hot("v", 1).unwrap();
    let log = e.info("v").unwrap().activity;
    assert!(log.get(&1).is_some_and(|l| l.contains(&3)), "{log:?}");
    assert!(log.get(&1).is_none_or(|l| !l.contains(&4)), "{log:?}");
    e.lock().end_writing("v", &[3]);
    assert!(e.lock().writing.is_empty());
}

/// Reads read their slots outside the node lock; a slot freed meanwhile
/// is not handed out again while a read may still be reading it.
#[test]
fn a_freed_slot_is_not_reused_while_a_read_is_in_flight() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("a", 2 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    e.create_volume("b", 2 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    e.write("a", 1, 0, &pattern(5, EXTENT_SIZE as usize), &[])
        .unwrap();
    e.flush(None).unwrap();
    e.delete_volume("a").unwrap();
    let flushed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // What a read holds while it reads: the node lock is free (other
        // reads, writes and lookups go on), slot reuse is not.
        let reading = e.reading.read().unwrap();
        assert!(e
            .read("b", 0, EXTENT_SIZE)
            .unwrap()
            .data
            .iter()
            .all(|b| *b == 0));
        let flush = s.spawn(|| {
            e.flush(None).unwrap();
            flushed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !flushed.load(std::sync::atomic::Ordering::SeqCst),
            "the flush returned the freed slot to use under a read"
        );
        drop(reading);
        flush.join().unwrap();
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst));
    });
    // Now the slot is reused.
    e.write("b", 1, 0, &pattern(6, BLOCK_SIZE as usize), &[])
        .unwrap();
    let (_, off) = e.block_location("b", 0).unwrap().unwrap();
    assert_eq!(off, 0, "slot 0 is reused after the flush");
}

/// How many pages of `path` are in the page cache (`fincore`).
fn resident_pages(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--noheadings", "--output", "PAGES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Reads take the data around the page cache (`O_DIRECT`) where the file
/// system allows it, and still see a write that is only in dirty pages.
#[test]
fn reads_bypass_the_page_cache_and_see_writes_not_yet_written_back() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().to_path_buf()]);
    e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    let data = pattern(7, 64 * BLOCK_SIZE as usize);
    // Block by block: small writes go through the page cache (a large one
    // would go around it too).
    for (i, blk) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        e.write("v", 1, i as u64 * BLOCK_SIZE, blk, &[]).unwrap();
    }
    // Not flushed: the blocks are dirty pages, which a direct read must
    // not miss.
    let out = e.read("v", 0, data.len() as u64).unwrap();
    assert!(out.bad_blocks.is_empty());
    assert_eq!(out.data, data);

    e.flush(None).unwrap();
    let (slab, _) = e.block_location("v", 0).unwrap().unwrap();
    let f = File::open(&slab).unwrap();
    // SAFETY: a plain syscall on an fd we own, no pointers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(
        resident_pages(&slab),
        0,
        "the slab's clean pages were dropped"
    );
    let out = e.read("v", 0, data.len() as u64).unwrap();
    assert_eq!(out.data, data);
    let direct = e.lock().direct.values().any(|d| d.is_some());
    let cached = resident_pages(&slab);
    if direct {
        // Only the sidecar's page came through the cache.
        assert!(
            cached <= 1,
            "{cached} pages cached after a direct read of 64"
        );
    } else {
        // No O_DIRECT here (tmpfs): the cache served it.
        assert!(
            cached >= 64,
            "{cached} pages cached after a buffered read of 64"
        );
    }
}

/// Large writes go around the page cache (`O_DIRECT`) where the file
/// system allows it, small ones through it, and whatever the mix every
/// read (direct or not, before a flush and after the engine is opened
/// again) returns the last data written, with checksums that verify.
#[test]
fn large_writes_bypass_the_page_cache_and_mix_with_small_ones() {
    let t = tempfile::tempdir().unwrap();
    let bs = BLOCK_SIZE as usize;
    let mut model = vec![0u8; 4 * EXTENT_SIZE as usize];
    let check = |e: &Engine, model: &[u8]| {
        let out = e.read("v", 0, model.len() as u64 / 2).unwrap();
        assert!(out.bad_blocks.is_empty(), "bad blocks {:?}", out.bad_blocks);
        assert!(out.data == model[..model.len() / 2], "data differs");
    };
    {
        let e = engine(&[t.path().to_path_buf()]);
        e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1, None)
            .unwrap();
        fn put(e: &Engine, model: &mut [u8], off: usize, data: Vec<u8>) {
            e.write("v", 1, off as u64, &data, &[]).unwrap();
            model[off..off + data.len()].copy_from_slice(&data);
        }
        // Small writes left dirty, then a large one across them and past
        // them, then small ones inside the large one's range; and a large
        // write that is not aligned in memory (a copy goes to the disk).
        for i in 0..64 {
            put(&e, &mut model, i * bs, pattern(i as u64, bs));
        }
        put(&e, &mut model, 32 * bs, pattern(100, 64 * bs));
        for i in [40usize, 41, 95] {
            put(&e, &mut model, i * bs, pattern(200 + i as u64, bs));
        }
        let mut odd = vec![0u8; 64 * bs + 1];
        odd[1..].copy_from_slice(&pattern(300, 64 * bs));
        put(&e, &mut model, 200 * bs, odd[1..].to_vec());
        e.write("v", 1, 300 * bs as u64, &odd[1..], &[]).unwrap();
        model[300 * bs..364 * bs].copy_from_slice(&odd[1..]);
        check(&e, &model);
        e.flush(None).unwrap();
        check(&e, &model);

        // Around the cache: a large write into a flushed slab whose pages
        // were dropped brings at most its sidecar page in.
        let (slab, _) = e.block_location("v", 0).unwrap().unwrap();
        let f = File::open(&slab).unwrap();
        // SAFETY: a plain syscall on an fd we own, no pointers.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let before = resident_pages(&slab);
        put(&e, &mut model, EXTENT_SIZE as usize, pattern(400, 64 * bs));
        let grew = resident_pages(&slab) - before;
        if e.lock().direct.values().any(|d| d.is_some()) {
            assert!(grew <= 1, "{grew} pages cached by a direct write of 64");
        } else {
            // No O_DIRECT here (tmpfs): the cache took it.
            assert!(grew >= 64, "{grew} pages cached by a buffered write of 64");
        }
        check(&e, &model);
        e.flush(None).unwrap();
    }
    // Opened again (a restart): the same data, every checksum verifying.
    let e = engine(&[t.path().to_path_buf()]);
    check(&e, &model);
}

/// A 1-replica volume in `dir` with 4 blocks of pattern `seed` written and
/// flushed at its start: the slab's path, the slot's byte offset in it,
/// the slab opened for reading, and the data.
fn four_blocks_on_disk(dir: &Path, seed: u64) -> (PathBuf, u64, File, Vec<u8>) {
    let e = engine(&[dir.to_path_buf()]);
    e.create_volume("v", EXTENT_SIZE, vec![], 1, None).unwrap();
    let data = pattern(seed, 4 * BLOCK_SIZE as usize);
    e.write("v", 1, 0, &data, &[]).unwrap();
    e.flush(None).unwrap();
    let (slab, base) = e.block_location("v", 0).unwrap().unwrap();
    let f = File::open(&slab).unwrap();
    (slab, base, f, data)
}

/// Drops every page of `slab` (opened as `f`) from the page cache.
fn drop_from_cache(f: &File, slab: &Path) {
    // SAFETY: a plain syscall on an fd we own, no pointers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(resident_pages(slab), 0);
}

/// A read takes the direct path only with a block-aligned buffer: an
/// unaligned one goes through the page cache (and still reads right).
/// (Where the data dir's file system refuses `O_DIRECT` the engine keeps no
/// direct handle; tmpfs accepts it on recent kernels, so that fallback is
/// not exercised by a test here.)
#[test]
fn only_block_aligned_buffers_take_the_direct_path() {
    let t = tempfile::tempdir().unwrap();
    let (slab, base, f, data) = four_blocks_on_disk(t.path(), 8);
    let len = data.len();
    let drop_cache = || drop_from_cache(&f, &slab);
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&slab)
        .ok();
    let mut buf = IoBuf::zeroed(len + 1);

    drop_cache();
    let odd = &mut buf[1..1 + len];
    assert!(!blocks::is_block_aligned(odd));
    assert!(blocks::read_blocks(&f, direct.as_ref(), base, 0, odd)
        .unwrap()
        .is_empty());
    assert_eq!(odd, &data[..]);
    let cached = resident_pages(&slab);
    assert!(
        cached >= 4,
        "{cached} pages cached after a read through the cache"
    );

    drop_cache();
    let aligned = &mut buf[..len];
    aligned.fill(0);
    assert!(blocks::is_block_aligned(aligned));
    assert!(blocks::read_blocks(&f, direct.as_ref(), base, 0, aligned)
        .unwrap()
        .is_empty());
    assert_eq!(aligned, &data[..]);
    let cached = resident_pages(&slab);
    if direct.is_some() {
        assert!(cached <= 1, "{cached} pages cached after a direct read");
    } else {
        assert!(
            cached >= 4,
            "{cached} pages: no O_DIRECT here, the cache serves"
        );
    }
}

/// A direct read that fails after the slab opened (here: a handle the
/// kernel refuses to read from) is done again through the page cache.
#[test]
fn a_failed_direct_read_is_served_through_the_page_cache() {
    let t = tempfile::tempdir().unwrap();
    let (slab, base, f, data) = four_blocks_on_disk(t.path(), 9);
    let len = data.len();
    drop_from_cache(&f, &slab);
    let refusing = OpenOptions::new().write(true).open(&slab).unwrap();
    let mut buf = IoBuf::zeroed(len);
    let aligned = &mut buf[..];
    assert!(blocks::is_block_aligned(aligned));
    let mut probe = vec![0u8; 1];
    assert!(refusing.read_exact_at(&mut probe, base).is_err());
    let bad = blocks::read_blocks(&f, Some(&refusing), base, 0, aligned).unwrap();
    assert!(bad.is_empty());
    assert_eq!(aligned, &data[..]);
    let cached = resident_pages(&slab);
    assert!(
        cached >= 4,
        "{cached} pages cached: the cache did not serve"
    );
}

#[test]
fn reads_of_a_batch_give_what_each_read_alone_gives() {
    let t = tempfile::tempdir().unwrap();
    let e = engine(&[t.path().join("d1"), t.path().join("d2")]);
    e.create_volume("v", 4 * EXTENT_SIZE, vec![], 1, None)
        .unwrap();
    // Extents 0-2 written (the last in part), extent 3 never.
    let data = pattern(9, (2 * EXTENT_SIZE + EXTENT_SIZE / 2) as usize);
    for (i, chunk) in data.chunks(MAX_IO as usize).enumerate() {
        e.write("v", 1, i as u64 * MAX_IO, chunk, &[]).unwrap();
    }
    let bad = BLOCKS_PER_EXTENT + 5;
    flip(&e, "v", bad, 7);
    let b = BLOCK_SIZE;
    let mut ranges = vec![
        (0, b),
        // Across extents 0 and 1, with the bad block.
        (EXTENT_SIZE - 2 * b, 8 * b),
        // Written and unwritten parts of extent 2, and extent 3.
        (2 * EXTENT_SIZE + EXTENT_SIZE / 2 - b, 2 * b),
        (3 * EXTENT_SIZE, 16 * b),
        // Refused: past the end, not whole blocks, too long.
        (4 * EXTENT_SIZE, b),
        (100, b),
        (0, MAX_IO + b),
    ];
    // More than one submission's worth of reads at random places.
    let mut x = 12345u64;
    for _ in 0..300 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        ranges.push(((x >> 20) % (4 * EXTENT_SIZE / b - 4) * b, (1 + x % 4) * b));
    }
    let before = e.metrics.checksum_errors.load(Ordering::Relaxed);
    let got = e.read_many("v", &ranges);
    assert_eq!(got.len(), ranges.len());
    let batch_errors = e.metrics.checksum_errors.load(Ordering::Relaxed) - before;
    let mut alone_errors = 0;
    for (i, (&(o, l), g)) in ranges.iter().zip(&got).enumerate() {
        let alone = e.read("v", o, l);
        match (g, alone) {
            (Ok(g), Ok(a)) => {
                assert_eq!(g.data, a.data, "range {i} at {o}+{l}");
                assert_eq!(g.bad_blocks, a.bad_blocks, "range {i}");
                alone_errors += a.bad_blocks.len() as u64;
            }
            (Err(g), Err(a)) => assert_eq!(g, &a, "range {i}"),
            (g, a) => panic!("range {i}: batch {g:?}, alone {a:?}"),
        }
    }
    assert!(matches!(got[1], Ok(ref o) if o.bad_blocks == vec![bad]));
    assert!(matches!(got[3], Ok(ref o) if o.data.iter().all(|b| *b == 0)));
    assert!(got[4].is_err() && got[5].is_err() && got[6].is_err());
    assert!(batch_errors >= 1);
    assert_eq!(batch_errors, alone_errors);
    // Handed on as they land: every range exactly once, refused ones
    // before anything goes to the disk.
    let mut seen = vec![0u32; ranges.len()];
    let mut rounds = 0;
    e.read_many_each("v", &ranges, |round| {
        if rounds == 0 {
            assert!(round.iter().any(|(i, r)| *i == 4 && r.is_err()));
        }
        rounds += 1;
        for (i, _) in round {
            seen[i] += 1;
        }
    });
    assert!(seen.iter().all(|n| *n == 1), "{seen:?}");
    assert!(rounds >= 2);
    // An unknown volume fails every read.
    let none = e.read_many("w", &[(0, b), (b, b)]);
    assert!(none.iter().all(|r| matches!(r, Err(Error::NotFound(_)))));
}
