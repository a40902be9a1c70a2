//! Scrub compares the replicas with each other: a block overwritten on one
//! replica with a valid checksum (what a bare TCP client could do before
//! the port was authenticated, and a bug or an insider still could) is
//! invisible to that replica's own checksums, but its region's digest
//! differs from the writer's, and the writer's copy is put back.

mod common;

use common::*;
use kiln_store::proto::{Request, Response, ScrubReport};
use kiln_store::transport::{Connector, Link};

fn scrub(n: &Node) -> ScrubReport {
    match n.call(Request::VolScrub { name: "vol".into() }).unwrap() {
        Response::Scrub(r) => r,
        r => panic!("{r:?}"),
    }
}

#[test]
fn scrub_finds_replicas_that_differ_and_repairs_them_from_the_writer() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "4M", &[&n1, &n2]);
    for (off, seed) in [(0u64, 1u64), (2 << 20, 2)] {
        n1.call(Request::VolWrite {
            name: "vol".into(),
            offset: off,
            data: pattern(seed, 64 << 10),
        })
        .unwrap();
    }
    let clean = scrub(&n1);
    assert_eq!((clean.compared_regions, clean.diverged_regions), (4, 0));

    // A peer of the cluster writes one block of n2's replica at the current
    // epoch, checksum and all, telling nobody.
    let mut link = Link::new(connector_as(base, "n3").connect("n2", &n2.addr()).unwrap());
    let epoch = replica_info(&mut link, "vol").epoch;
    link.call(&Request::Write {
        name: "vol".into(),
        epoch,
        offset: (2 << 20) + 3 * 4096,
        data: vec![0x66; 4096].into(),
        stale: vec![],
    })
    .unwrap();
    let size = 4 << 20;
    assert_ne!(
        n1.replica_read_all("vol", size),
        n2.replica_read_all("vol", size)
    );

    // Each replica's own checksums are fine; the comparison is not.
    let r = scrub(&n1);
    assert!(r.bad_blocks.is_empty(), "{r:?}");
    assert_eq!(r.compared_regions, 4, "{r:?}");
    assert_eq!(r.diverged_regions, 1, "{r:?}");
    assert_eq!(
        n1.replica_read_all("vol", size),
        n2.replica_read_all("vol", size)
    );
    assert_eq!(scrub(&n1).diverged_regions, 0);

    // The CLI says so too.
    let out = n1.cli_ok(&["scrub", "vol"]);
    assert!(
        out.contains("4 regions compared") && out.contains("0 differed"),
        "{out}"
    );
}
