//! Three real daemons on loopback: synchronous mirroring, resync after a
//! kill -9, and epoch fencing.

mod common;

use std::time::Duration;

use common::*;
use kiln_store::proto::{Request, Response};
use kiln_store::{VolumeClient, VolumeIo};

const MIB: u64 = 1 << 20;

fn three_nodes(base: &std::path::Path) -> Vec<Node> {
    vec![
        Node::new(base, "n1", 2),
        Node::new(base, "n2", 1),
        Node::new(base, "n3", 1),
    ]
}

fn create(nodes: &[Node], writer: usize, vol: &str, size: &str) {
    let replicas: Vec<&Node> = nodes.iter().collect();
    nodes[writer].create_volume(vol, size, &replicas);
}

#[test]
fn three_replicas_hold_identical_data() {
    let t = tempfile::tempdir().unwrap();
    let nodes = three_nodes(t.path());
    create(&nodes, 0, "vol1", "16M");
    let v = VolumeClient::open(&nodes[0].socket, "vol1").unwrap();
    let size = 16 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(42);
    for i in 0..60 {
        // Random offsets and lengths, some unaligned (read-modify-write).
        let len = 1 + rng.below(300_000) as usize;
        let off = rng.below(size - len as u64);
        let data = pattern(i, len);
        v.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    v.flush().unwrap();
    let mut back = vec![0u8; size as usize];
    v.read_at(&mut back, 0).unwrap();
    assert!(back == model, "writer read-back differs");
    for n in &nodes {
        assert!(
            n.replica_read_all("vol1", size) == model,
            "replica on {} differs",
            n.id
        );
    }
    let st = nodes[0].status("vol1");
    assert!(st.replicas.iter().all(|r| r.state == "in-sync"), "{st:?}");
    // Thin provisioning: only written extents are allocated, across 2 disks.
    assert!(st.allocated_bytes <= size);
    for d in 0..2 {
        assert!(kiln_store::engine::slab_space(&nodes[0].data_dir(d)).unwrap() > 0);
    }
    // The CLI shows it, as a table and as JSON.
    let out = nodes[0].cli_ok(&["show", "vol1"]);
    assert!(out.contains("in-sync") && out.contains("n3"), "{out}");
    let out = nodes[0].cli_ok(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "vol1");
    assert_eq!(v[0]["size"], size);
    // Export equals what was written; import of an image reads back.
    let img = t.path().join("out.img");
    nodes[0].cli_ok(&["export", "vol1", "--to", img.to_str().unwrap()]);
    assert!(std::fs::read(&img).unwrap() == model);
    let src = t.path().join("in.img");
    let mut image = pattern(99, 5 * MIB as usize);
    image[MIB as usize..2 * MIB as usize].fill(0);
    std::fs::write(&src, &image).unwrap();
    create(&nodes, 0, "vol2", "8M");
    let o = nodes[0].cli(&["import", "vol2", "--from", src.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        o.stderr.is_empty(),
        "no progress bar without a terminal: {o:?}"
    );
    assert!(nodes[2].replica_read_all("vol2", 5 * MIB) == image);
    // On a terminal (`script` gives it one) the import shows a progress
    // bar, and clears it for the summary.
    let o = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{BIN} volume --socket {} import vol2 --from {}",
            nodes[0].socket.display(),
            src.display()
        ))
        .arg("/dev/null")
        .output()
        .expect("script (bsdutils) runs");
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        shown.contains("/5242880 (") && shown.ends_with("imported 5.0 MiB into vol2\r\n"),
        "no bar on a terminal: {shown:?}"
    );
    // Bad input: a clear one-line error and a non-zero exit.
    let o = nodes[0].cli(&["import", "vol2", "--from", "/nonexistent"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("kiln-store: error: ") && err.lines().count() == 1,
        "{err}"
    );
    let o = nodes[0].cli(&[
        "create",
        "bad/name",
        "--size",
        "1M",
        "--replica",
        "n1=127.0.0.1:1",
    ]);
    assert!(!o.status.success());
    // A create that cannot reach every replica fails and leaves nothing.
    let n1 = nodes[0].replica_arg();
    let o = nodes[0].cli(&[
        "create",
        "vol3",
        "--size",
        "1M",
        "--replica",
        &n1,
        "--replica",
        "n9=127.0.0.1:1",
    ]);
    assert!(!o.status.success());
    assert!(nodes[0]
        .call(kiln_store::proto::Request::ReplicaInfo {
            name: "vol3".into()
        })
        .is_err());
}

#[test]
fn killed_replica_resyncs_only_changed_regions() {
    let t = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(t.path());
    let size = 64 * MIB;
    create(&nodes, 0, "vol", "64M");
    let v = VolumeClient::open(&nodes[0].socket, "vol").unwrap();
    let mut model = pattern(1, size as usize);
    v.write_at(&model, 0).unwrap();
    v.flush().unwrap();

    // A continuous stream of writes to the first 8 regions, flushing every
    // 8 writes; n3 is killed in the middle of it.
    let hot = 8 * MIB;
    let mut rng = Rng(7);
    let mut seq = 100;
    let mut write = |v: &VolumeClient, model: &mut Vec<u8>, rng: &mut Rng| {
        seq += 1;
        let off = rng.below(hot / 4096 - 16) * 4096;
        let data = pattern(seq, 16 * 4096);
        v.write_at(&data, off).unwrap(); // must never fail: degraded is fine
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if seq % 8 == 0 {
            v.flush().unwrap();
        }
    };
    for _ in 0..40 {
        write(&v, &mut model, &mut rng);
    }
    nodes[2].kill9();
    for _ in 0..200 {
        write(&v, &mut model, &mut rng);
    }
    let st = nodes[0].status("vol");
    let n3 = st.replicas.iter().find(|r| r.node == "n3").unwrap();
    assert_eq!(n3.state, "stale");
    assert!(n3.dirty_regions >= 1 && n3.dirty_regions <= 8, "{n3:?}");
    // Everything acknowledged is on the survivors.
    for n in &nodes[..2] {
        assert!(
            n.replica_read_all("vol", size) == model,
            "{} lost data",
            n.id
        );
    }
    nodes[2].start();
    // Writes continue during the resync.
    for _ in 0..60 {
        write(&v, &mut model, &mut rng);
    }
    let out = nodes[0].cli_ok(&["wait-sync", "vol", "--timeout", "30", "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(shown["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "in-sync"));
    let st = nodes[0].status("vol");
    // Only the regions written while n3 was away (at most the 8 hot ones)
    // were copied, not the 64 MiB volume.
    assert!(st.resync_bytes > 0, "{st:?}");
    assert!(st.resync_bytes <= hot, "resynced {} bytes", st.resync_bytes);
    assert!(st.resync_regions <= 8);
    let json = nodes[0].cli_ok(&["show", "vol", "--json"]);
    assert!(json.contains("\"resync_bytes\""));
    for n in &nodes {
        assert!(n.replica_read_all("vol", size) == model, "{} differs", n.id);
    }
}

#[test]
fn raised_epoch_fences_a_stopped_old_writer() {
    let t = tempfile::tempdir().unwrap();
    let nodes = three_nodes(t.path());
    let size = 8 * MIB;
    create(&nodes, 0, "vol", "8M");
    let old = VolumeClient::open(&nodes[0].socket, "vol").unwrap();
    let mut model = pattern(3, size as usize);
    old.write_at(&model, 0).unwrap();
    old.flush().unwrap();

    // The old writer freezes (as if partitioned); the VM moves to n2, which
    // writes, then steps back (detach) before it ever reaches n1.
    nodes[0].signal(libc::SIGSTOP);
    nodes[1].cli_ok(&["attach", "vol"]);
    let new = VolumeClient::open(&nodes[1].socket, "vol").unwrap();
    let newer = pattern(4, 2 * MIB as usize);
    new.write_at(&newer, MIB).unwrap();
    new.flush().unwrap();
    model[MIB as usize..3 * MIB as usize].copy_from_slice(&newer);
    let epoch = nodes[1].status("vol").epoch;
    assert!(epoch > 2, "epoch {epoch}");
    nodes[1].cli_ok(&["detach", "vol"]);

    // The old writer wakes up and writes to a region the new writer never
    // touched: its own replica, whose epoch nobody could raise, takes it;
    // n2 and n3 refuse it, so it is never acknowledged.
    nodes[0].signal(libc::SIGCONT);
    let stale = pattern(5, MIB as usize);
    assert!(
        old.write_at(&stale, 5 * MIB).is_err(),
        "fenced write acknowledged"
    );
    assert!(
        nodes[0].replica_read("vol", 5 * MIB, MIB).data == stale,
        "the fenced writer's local replica should hold its unacknowledged write"
    );
    for n in &nodes[1..] {
        assert!(n.replica_read("vol", 5 * MIB, MIB).data != stale);
        assert!(n.replica_read("vol", MIB, 2 * MIB).data == newer);
    }
    for i in 0..8u64 {
        let r = old.write_at(&stale, i * MIB);
        assert!(r.is_err(), "old writer's write {i} was acknowledged");
    }
    assert!(old.flush().is_err());
    assert!(nodes[0].status("vol").fenced);

    // n2 takes over again; n1 rejoins and the region its fenced writer
    // wrote is resynced along with the ones it missed.
    nodes[1].cli_ok(&["attach", "vol"]);
    // No newer data was overwritten, and once n1 rejoins it holds the new
    // data too (the regions its fenced writer wrote locally are resynced).
    wait_until("n1 back in sync", Duration::from_secs(30), || {
        nodes[1]
            .status("vol")
            .replicas
            .iter()
            .all(|r| r.state == "in-sync")
    });
    for n in &nodes {
        assert!(n.replica_read_all("vol", size) == model, "{} differs", n.id);
    }
    let mut back = vec![0u8; size as usize];
    new.read_at(&mut back, 0).unwrap();
    assert!(back == model);
}

#[test]
fn rebuild_moves_a_replica_online() {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    let mut n2 = Node::new(t.path(), "n2", 1);
    let n3 = Node::new(t.path(), "n3", 1);
    let size = 8 * MIB;
    n1.cli_ok(&[
        "create",
        "vol",
        "--size",
        "8M",
        "--replica",
        &n1.replica_arg(),
        "--replica",
        &n2.replica_arg(),
    ]);
    let v = VolumeClient::open(&n1.socket, "vol").unwrap();
    // Leave a hole: region 4 is never written and must stay unallocated.
    let mut model = pattern(8, size as usize);
    model[4 * MIB as usize..5 * MIB as usize].fill(0);
    v.write_at(&model[..4 * MIB as usize], 0).unwrap();
    v.write_at(&model[5 * MIB as usize..], 5 * MIB).unwrap();
    // Two snapshots: s1 of that, s2 after region 0 changed and region 6
    // was discarded; then the live volume changes region 1.
    let s1 = model.clone();
    n1.cli_ok(&["snapshot", "vol", "s1"]);
    model[..MIB as usize].copy_from_slice(&pattern(10, MIB as usize));
    v.write_at(&model[..MIB as usize], 0).unwrap();
    v.discard(6 * MIB, MIB).unwrap();
    model[6 * MIB as usize..7 * MIB as usize].fill(0);
    let s2 = model.clone();
    n1.cli_ok(&["snapshot", "vol", "s2"]);
    model[MIB as usize..2 * MIB as usize].copy_from_slice(&pattern(11, MIB as usize));
    v.write_at(&model[MIB as usize..2 * MIB as usize], MIB)
        .unwrap();
    // n2's disk dies for good. Re-attaching with half the replicas gone
    // needs --force: the survivor alone cannot prove it is current.
    n2.kill9();
    n1.cli_ok(&["detach", "vol"]);
    let o = n1.cli(&["attach", "vol"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("majority"));
    n1.cli_ok(&["attach", "vol", "--force"]);
    let v = VolumeClient::open(&n1.socket, "vol").unwrap();
    // Replace n2 with a new replica on n3.
    let out = n1.cli_ok(&[
        "rebuild",
        "vol",
        "--add",
        &n3.replica_arg(),
        "--remove",
        "n2",
        "--json",
    ]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let reps = st["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 2, "{out}");
    assert!(reps.iter().all(|r| r["state"] == "in-sync"), "{out}");
    assert!(reps.iter().any(|r| r["node"] == "n3"));
    assert!(n3.replica_read_all("vol", size) == model);
    assert_eq!(
        n3.status("vol").allocated_bytes,
        6 * MIB,
        "holes stay holes"
    );
    // The new replica has both snapshots, with their data, sharing extents
    // where the source's do: s1 and s2 differ in regions 0 and 6, s2 and
    // the live volume in region 1.
    let layout = match n3.call(Request::Layout { name: "vol".into() }).unwrap() {
        Response::Layout(l) => l,
        r => panic!("unexpected reply {r:?}"),
    };
    let names: Vec<&str> = layout.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "s2"]);
    let ext = |regions: &[(u64, u64)], r: u64| regions.iter().find(|x| x.0 == r).map(|x| x.1);
    let (l1, l2) = (&layout.snapshots[0].regions, &layout.snapshots[1].regions);
    for r in 0..8 {
        let shared = ext(l1, r).is_some() && ext(l1, r) == ext(l2, r);
        assert_eq!(
            shared,
            ![0, 4, 6].contains(&r),
            "s1/s2 region {r}: {layout:?}"
        );
        let shared = ext(l2, r).is_some() && ext(l2, r) == ext(&layout.live, r);
        assert_eq!(
            shared,
            ![1, 4, 6].contains(&r),
            "s2/live region {r}: {layout:?}"
        );
    }
    for (snap, want) in [("s1", &s1), ("s2", &s2)] {
        let mut got = Vec::new();
        for off in (0..size).step_by(4 * MIB as usize) {
            match n3
                .call(Request::ReadSnapshot {
                    name: "vol".into(),
                    snap: snap.into(),
                    offset: off,
                    len: 4 * MIB,
                })
                .unwrap()
            {
                Response::Read(o) => {
                    assert!(o.bad_blocks.is_empty());
                    got.extend_from_slice(&o.data);
                }
                r => panic!("unexpected reply {r:?}"),
            }
        }
        assert!(&got == want, "snapshot {snap} differs on n3");
    }
    // Clones from a snapshot work on the rebuilt set.
    n1.cli_ok(&["clone", "vol", "s1", "c1"]);
    assert!(n3.replica_read_all("c1", size) == s1);
    // Writes go to the new set.
    let more = pattern(9, MIB as usize);
    v.write_at(&more, 2 * MIB).unwrap();
    assert!(n3.replica_read("vol", 2 * MIB, MIB).data == more);
}

/// Writes `n` 4 KiB writes one at a time, then one of 1 MiB, and flushes;
/// returns the writer's count of answers polled for and caught polling.
fn polled_after_lone_writes(nodes: &[Node], vol: &str, n: u64) -> (u64, u64) {
    create(nodes, 0, vol, "8M");
    let v = VolumeClient::open(&nodes[0].socket, vol).unwrap();
    for i in 0..n {
        v.write_at(&pattern(i, 4096), i * 4096).unwrap();
    }
    v.write_at(&pattern(n, MIB as usize), 4 * MIB).unwrap();
    v.flush().unwrap();
    let st = nodes[0].status(vol);
    (st.replies_polled, st.replies_caught_polling)
}

#[test]
fn a_lone_small_write_polls_for_its_replicas_answer_unless_told_not_to() {
    let t = tempfile::tempdir().unwrap();
    // A ceiling far above any answer here (even in a debug build on a busy
    // machine), so that the spin never has reason to shrink: every lone
    // small write polls, for its one remote replica's answer; the large
    // write and the flush wait for a disk and are not polled for.
    let long = ["--scrub-rate", "0", "--reply-poll-us", "10000"];
    let nodes = vec![
        Node::with_args(t.path(), "n1", 1, &long),
        Node::new(t.path(), "n2", 1),
    ];
    let (polled, caught) = polled_after_lone_writes(&nodes, "p", 100);
    assert_eq!(polled, 100, "one poll per lone small write");
    assert!(
        (50..=100).contains(&caught),
        "answers caught while polling: {caught} of {polled}"
    );
    let out = nodes[0].cli_ok(&["show", "p", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["replies_polled"], 100, "{out}");

    let off = ["--scrub-rate", "0", "--reply-poll-us", "0"];
    let t2 = tempfile::tempdir().unwrap();
    let quiet = vec![
        Node::with_args(t2.path(), "n1", 1, &off),
        Node::new(t2.path(), "n2", 1),
    ];
    assert_eq!(polled_after_lone_writes(&quiet, "q", 100), (0, 0));

    // Out of range is refused with a clear error.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-store"))
        .args(["serve", "--node-id", "x", "--data", "/nonexistent"])
        .args([
            "--listen",
            "127.0.0.1:1",
            "--insecure",
            "--reply-poll-us",
            "20000",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--reply-poll-us") && err.contains("20000"),
        "{err}"
    );
}
