//! Bit rot: a flipped byte in one replica's block file is detected, the
//! read returns correct data and the replica is repaired; scrub finds a flip
//! in an idle block; a flip on every replica is an I/O error, never bad data.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use kiln_store::proto::{Request, Response};
use kiln_store::{VolumeClient, VolumeIo};

fn flip(node: &Node, vol: &str, block: u64) {
    let (path, off) = match node
        .call(Request::BlockLocation {
            name: vol.into(),
            block,
        })
        .unwrap()
    {
        Response::Location(Some(l)) => l,
        r => panic!("no location: {r:?}"),
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off + 1234).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, off + 1234).unwrap();
}

#[test]
fn flipped_bytes_are_detected_and_repaired() {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    let n2 = Node::new(t.path(), "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    let v = VolumeClient::open(&n1.socket, "vol").unwrap();
    let data = pattern(1, 4 << 20);
    v.write_at(&data, 0).unwrap();
    v.flush().unwrap();
    let blk = |b: u64| &data[(b * 4096) as usize..((b + 1) * 4096) as usize];

    // Rot on the writer's local replica, which serves reads.
    flip(&n1, "vol", 10);
    assert_eq!(n1.replica_read("vol", 10 * 4096, 4096).bad_blocks, vec![10]);
    let mut buf = vec![0u8; 4096];
    v.read_at(&mut buf, 10 * 4096).unwrap();
    assert_eq!(buf, blk(10), "read must return the healthy replica's data");
    let r = n1.replica_read("vol", 10 * 4096, 4096);
    assert!(
        r.bad_blocks.is_empty() && r.data == blk(10),
        "n1 was not repaired"
    );
    let st = n1.status("vol");
    assert!(st.repaired_blocks >= 1 && st.checksum_errors >= 1, "{st:?}");

    // Rot in a block nobody reads: scrub finds and repairs it.
    flip(&n2, "vol", 700);
    let out = n1.cli_ok(&["scrub", "vol", "--json"]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["bad_blocks"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(rep["bad_blocks"][0]["block"], 700);
    assert_eq!(rep["repaired"], 1);
    let r = n2.replica_read("vol", 700 * 4096, 4096);
    assert!(r.bad_blocks.is_empty() && r.data == blk(700));
    let out = n1.cli_ok(&["scrub", "vol"]);
    assert!(out.contains("0 bad blocks"), "{out}");

    let st = n2.status("vol");
    assert!(
        st.node.checksum_errors >= 1 && st.node.scrub_repaired_blocks == 1,
        "{st:?}"
    );

    // Rot on every replica: an error, not silent bad data.
    flip(&n1, "vol", 20);
    flip(&n2, "vol", 20);
    assert!(v.read_at(&mut buf, 20 * 4096).is_err());
    // Neighbours still read fine.
    v.read_at(&mut buf, 21 * 4096).unwrap();
    assert_eq!(buf, blk(21));
}

#[test]
fn background_scrub_repairs_an_idle_block() {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    let n2 = Node::with_args(
        t.path(),
        "n2",
        1,
        &["--scrub-rate", "64M", "--scrub-interval", "1"],
    );
    n1.create_volume("vol", "2M", &[&n1, &n2]);
    let v = VolumeClient::open(&n1.socket, "vol").unwrap();
    let data = pattern(2, 2 << 20);
    v.write_at(&data, 0).unwrap();
    v.flush().unwrap();
    flip(&n2, "vol", 300);
    wait_until(
        "background scrub repair",
        std::time::Duration::from_secs(20),
        || n2.status("vol").node.scrub_repaired_blocks >= 1,
    );
    let r = n2.replica_read("vol", 300 * 4096, 4096);
    assert!(r.bad_blocks.is_empty() && r.data == data[300 * 4096..301 * 4096]);
    assert!(n2.status("vol").node.scrubbed_bytes >= 2 << 20);
}
