//! Failures never look like durability: a replica whose fdatasync fails
//! stops acknowledging (no retry into a false success), its writer marks
//! it stale with every region not yet flushed and carries on with the
//! others, and no acknowledged write is lost; a slow flush does not make a
//! healthy replica look failed. Faults are injected on the real daemon
//! through `KILN_STORE_FAULT_DIR` (see `kiln_store::faults`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_store::proto::{Request, Response};
use kiln_store::transport::{Connector, Link};

const SIZE: u64 = 4 << 20;

fn write(n: &Node, region: u64, seed: u64) {
    n.call(Request::VolWrite {
        name: "vol".into(),
        offset: region << 20,
        data: pattern(seed, 64 << 10),
    })
    .unwrap();
}

fn flush(n: &Node) {
    n.call(Request::VolFlush { name: "vol".into() }).unwrap();
}

fn state_of(n: &Node, peer: &str) -> String {
    n.status("vol")
        .replicas
        .iter()
        .find(|r| r.node == peer)
        .unwrap()
        .state
        .clone()
}

#[test]
fn a_failed_fdatasync_fails_the_replica_and_loses_no_acknowledged_write() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let mut n1 = Node::new(base, "n1", 1);
    let mut n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    write(&n1, 0, 1);
    flush(&n1);
    // Region 1 reaches n2's page cache; then n2's next sync fails.
    write(&n1, 1, 2);
    std::fs::write(n2.faults().join("fail-sync"), "").unwrap();
    flush(&n1);
    assert!(
        !n2.faults().join("fail-sync").exists(),
        "the fault was not hit"
    );
    assert_eq!(state_of(&n1, "n2"), "stale");
    // The writer recorded every region n2 may have lost, not only later ones.
    let info = n1.info("vol");
    assert!(info.stale["n2"].contains(&1), "{:?}", info.stale);

    // n2 acknowledges nothing now, to anyone: no retried sync passes for
    // a success.
    let mut link = Link::new(connector_as(base, "n1").connect("n2", &n2.addr()).unwrap());
    for req in [
        Request::ReplicaInfo { name: "vol".into() },
        Request::Flush {
            name: "vol".into(),
            epoch: info.epoch,
        },
    ] {
        let err = link.call(&req).unwrap_err().to_string();
        assert!(err.contains("has failed"), "{req:?}: {err}");
    }
    // The writer carries on with n1; writes after the fault are acknowledged.
    write(&n1, 2, 3);
    flush(&n1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state_of(&n1, "n2"), "stale", "a failed replica came back");

    // Its operator restarts it; it resyncs what it may have lost.
    n2.kill9();
    n2.start();
    wait_until("n2 in sync", Duration::from_secs(30), || {
        state_of(&n1, "n2") == "in-sync"
    });
    let expect = n1.replica_read_all("vol", SIZE);
    assert_eq!(n2.replica_read_all("vol", SIZE), expect);
    // And it can take over with every acknowledged write.
    n1.kill9();
    n2.cli_ok(&["attach", "vol", "--force"]);
    let mut got = vec![0u8; SIZE as usize];
    for (k, chunk) in got.chunks_mut(1 << 20).enumerate() {
        match n2
            .call(Request::VolRead {
                name: "vol".into(),
                offset: (k as u64) << 20,
                len: 1 << 20,
            })
            .unwrap()
        {
            Response::Read(r) => chunk.copy_from_slice(&r.data),
            r => panic!("{r:?}"),
        }
    }
    for (region, seed) in [(0u64, 1u64), (1, 2), (2, 3)] {
        let at = (region << 20) as usize;
        assert_eq!(
            got[at..at + (64 << 10)],
            pattern(seed, 64 << 10)[..],
            "region {region}"
        );
    }
}

#[test]
fn a_slow_flush_does_not_make_a_healthy_replica_stale() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    write(&n1, 0, 1);
    flush(&n1);
    // n2's disk now takes 4 s per sync: longer than the 3 s a peer has to
    // answer a write, well within what it has for a flush.
    std::fs::write(n2.faults().join("slow-sync-ms"), "4000").unwrap();
    write(&n1, 0, 2);
    let start = Instant::now();
    flush(&n1);
    let took = start.elapsed();
    assert_eq!(state_of(&n1, "n2"), "in-sync", "flush took {took:?}");
    assert!(
        took >= Duration::from_secs(4),
        "the slow sync was not hit ({took:?})"
    );
    std::fs::remove_file(n2.faults().join("slow-sync-ms")).unwrap();
    assert_eq!(
        n2.replica_read("vol", 0, 64 << 10).data,
        pattern(2, 64 << 10)
    );
}

#[test]
fn a_commit_waiting_for_the_disk_holds_up_no_other_volume() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = std::sync::Arc::new(Node::new(base, "n1", 1));
    for vol in ["a", "b"] {
        n1.cli_ok(&[
            "create",
            vol,
            "--size",
            "4M",
            "--replica",
            &n1.replica_arg(),
        ]);
    }
    n1.call(Request::VolWrite {
        name: "b".into(),
        offset: 0,
        data: vec![7; 4096],
    })
    .unwrap();
    // Every sync now takes 1.5 s; a first write to a region of `a` waits
    // for one (its activity log must be durable before the data lands).
    std::fs::write(n1.faults().join("slow-sync-ms"), "1500").unwrap();
    let writer = {
        let n1 = n1.clone();
        std::thread::spawn(move || {
            n1.call(Request::VolWrite {
                name: "a".into(),
                offset: 2 << 20,
                data: vec![1; 4096],
            })
            .unwrap();
            Instant::now()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile `b` is read: it needs no sync and must not queue behind
    // `a`'s commit.
    match n1
        .call(Request::VolRead {
            name: "b".into(),
            offset: 0,
            len: 4096,
        })
        .unwrap()
    {
        Response::Read(r) => assert_eq!(r.data, vec![7; 4096]),
        r => panic!("{r:?}"),
    }
    let read_done = Instant::now();
    let write_done = writer.join().unwrap();
    std::fs::remove_file(n1.faults().join("slow-sync-ms")).unwrap();
    assert!(
        read_done < write_done,
        "the read of b waited for a's commit ({:?} after it)",
        read_done - write_done
    );
}

/// A rolling update: the writer's node runs a kiln-store that sends write
/// batches, a replica still one that predates them (injected: it answers
/// a batch as a message it cannot decode, applying none of it). The
/// writer sends that replica the batch's writes one by one and keeps it in
/// sync; nothing is lost and the replicas stay identical.
#[test]
fn a_replica_that_predates_write_batches_gets_single_writes_and_stays_in_sync() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    std::fs::write(n2.faults().join("no-write-batch"), "").unwrap();
    // Eight writers at once, each to its own blocks: their writes queue
    // behind each other and leave as batches.
    const WRITERS: u64 = 8;
    const EACH: u64 = 64;
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let n1 = &n1;
            s.spawn(move || {
                for i in 0..EACH {
                    let block = i * WRITERS + w;
                    n1.call(Request::VolWrite {
                        name: "vol".into(),
                        offset: block * 4096,
                        data: pattern(block + 1, 4096),
                    })
                    .unwrap();
                }
            });
        }
    });
    flush(&n1);
    assert!(
        n2.log()
            .contains("answering a write batch as an older kiln-store"),
        "no batch reached the older replica: the test proved nothing"
    );
    // Learnt once: later batches go to it as single writes at once (at
    // most the batches already in flight meanwhile were refused too).
    let refused = n2
        .log()
        .matches("answering a write batch as an older kiln-store")
        .count();
    assert!(
        refused <= batch_leaders(),
        "{refused} batches refused: the writer did not remember"
    );
    assert_eq!(
        n1.log().matches("does not take write batches").count(),
        1,
        "{}",
        n1.log()
    );
    assert_eq!(state_of(&n1, "n2"), "in-sync");
    let mut model = vec![0u8; SIZE as usize];
    for block in 0..WRITERS * EACH {
        let at = (block * 4096) as usize;
        model[at..at + 4096].copy_from_slice(&pattern(block + 1, 4096));
    }
    assert!(
        n1.replica_read_all("vol", SIZE) == model,
        "n1 differs from the model"
    );
    assert!(
        n2.replica_read_all("vol", SIZE) == model,
        "n2 differs from the model"
    );
}

/// Most write batches of one volume in flight at once (`MAX_LEADERS` of
/// `store/src/writer/batch.rs`).
fn batch_leaders() -> usize {
    2
}
