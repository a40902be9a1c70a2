//! Snapshots and clones across three replicas.

mod common;

use common::*;
use kiln_store::{VolumeClient, VolumeIo};

const MIB: u64 = 1 << 20;

fn slab_space(n: &Node) -> u64 {
    kiln_store::engine::slab_space(&n.data_dir(0)).unwrap()
}

#[test]
fn clone_sees_snapshot_and_does_not_change_base() {
    let t = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Node::new(t.path(), id, 1))
        .collect();
    let reps: Vec<String> = nodes.iter().map(|n| n.replica_arg()).collect();
    nodes[0].cli_ok(&[
        "create",
        "base",
        "--size",
        "4M",
        "--replica",
        &reps[0],
        "--replica",
        &reps[1],
        "--replica",
        &reps[2],
    ]);
    let base = VolumeClient::open(&nodes[0].socket, "base").unwrap();
    let a = pattern(1, 2 * MIB as usize);
    base.write_at(&a, 0).unwrap();
    nodes[0].cli_ok(&["snapshot", "base", "s1"]);
    let b = pattern(2, MIB as usize);
    base.write_at(&b, 0).unwrap();
    nodes[0].cli_ok(&["clone", "base", "s1", "c1"]);
    let show = nodes[0].cli_ok(&["show", "base", "--json"]);
    assert!(show.contains("\"s1\""), "{show}");

    let clone = VolumeClient::open(&nodes[0].socket, "c1").unwrap();
    let mut got = vec![0u8; a.len()];
    clone.read_at(&mut got, 0).unwrap();
    assert!(got == a, "clone must see the snapshot's data");
    for n in &nodes {
        assert!(
            n.replica_read("c1", 0, 2 * MIB).data == a,
            "{}: clone differs",
            n.id
        );
    }
    let c = pattern(3, MIB as usize);
    clone.write_at(&c, MIB).unwrap();
    let mut base_now = a.clone();
    base_now[..MIB as usize].copy_from_slice(&b);
    let mut clone_now = a.clone();
    clone_now[MIB as usize..].copy_from_slice(&c);
    for n in &nodes {
        assert!(
            n.replica_read("base", 0, 2 * MIB).data == base_now,
            "{}: base changed",
            n.id
        );
        assert!(
            n.replica_read("c1", 0, 2 * MIB).data == clone_now,
            "{}: clone",
            n.id
        );
    }

    // Deleting the snapshot keeps the clone intact; deleting the clone then
    // frees the extents only it and the snapshot used.
    let before = slab_space(&nodes[1]);
    nodes[0].cli_ok(&["snapshot", "base", "s1", "--delete"]);
    for n in &nodes {
        assert!(n.replica_read("c1", 0, 2 * MIB).data == clone_now);
    }
    nodes[0].cli_ok(&["delete", "c1"]);
    let after = slab_space(&nodes[1]);
    assert!(after < before, "no space reclaimed: {before} -> {after}");
    assert!(
        after <= 2 * (MIB + 4096),
        "only base's two extents remain: {after} bytes held"
    );
    for n in &nodes {
        assert!(n.replica_read("base", 0, 2 * MIB).data == base_now);
    }
}
