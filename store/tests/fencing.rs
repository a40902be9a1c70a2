//! Fencing under races and hostile numbers: two attaches from different
//! nodes that race never both become writer; an epoch near `u64::MAX`
//! from the network is refused cleanly; region numbers from the network
//! are checked.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};

use common::*;
use kiln_store::proto::{Request, Response};
use kiln_store::transport::Connector;

fn attach(n: &Node) -> Option<u64> {
    match n.call(Request::VolAttach {
        name: "vol".into(),
        force: false,
        key: None,
        next_key: None,
    }) {
        Ok(Response::Status(s)) => Some(s.epoch),
        _ => None,
    }
}

fn write(n: &Node, byte: u8) -> bool {
    n.call(Request::VolWrite {
        name: "vol".into(),
        offset: 0,
        data: vec![byte; 4096],
    })
    .is_ok()
}

fn detach(n: &Node) {
    n.call(Request::VolDetach { name: "vol".into() }).unwrap();
}

#[test]
fn racing_attaches_from_two_nodes_never_make_two_writers() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Arc::new(Node::new(base, "n2", 1));
    let n3 = Arc::new(Node::new(base, "n3", 1));
    n1.create_volume("vol", "1M", &[&n1, &n2, &n3]);
    detach(&n1);
    let mut both = 0;
    for round in 0..30 {
        let go = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [n2.clone(), n3.clone()]
            .into_iter()
            .map(|n| {
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    attach(&n)
                })
            })
            .collect();
        let epochs: Vec<Option<u64>> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        if let [Some(a), Some(b)] = epochs[..] {
            both += 1;
            assert_ne!(a, b, "round {round}: two writers at epoch {a}");
        }
        // However the race went, at most one of them can still write.
        let wrote = [write(&n2, 2), write(&n3, 3)];
        assert!(
            wrote.iter().filter(|w| **w).count() <= 1,
            "round {round}: both wrote (attach epochs {epochs:?})"
        );
        detach(&n2);
        detach(&n3);
    }
    eprintln!("both attaches returned in {both} of 30 rounds (with distinct epochs)");
    // The volume is still usable afterwards.
    assert!(attach(&n1).is_some());
    assert!(write(&n1, 1));
}

#[test]
fn hostile_epochs_and_regions_from_the_network_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "1M", &[&n1, &n2]);
    // A peer of the cluster (it holds a certificate) sends bad numbers.
    let mut link = kiln_store::transport::Link::new(
        connector_as(base, "n3").connect("n2", &n2.addr()).unwrap(),
    );
    let epoch = replica_info(&mut link, "vol").epoch;
    // Regions beyond the volume in a stale map: refused, nothing stored.
    let mut stale = BTreeMap::new();
    stale.insert("n1".to_string(), BTreeSet::from([u64::MAX]));
    let err = link
        .call(&Request::SetStaleMap {
            name: "vol".into(),
            epoch,
            stale,
        })
        .unwrap_err();
    assert!(err.to_string().contains("region"), "{err}");
    let mut stale = BTreeMap::new();
    stale.insert("../n1".to_string(), BTreeSet::from([0]));
    assert!(link
        .call(&Request::SetStaleMap {
            name: "vol".into(),
            epoch,
            stale,
        })
        .is_err());
    {
        let i = replica_info(&mut link, "vol");
        assert!(i.stale.is_empty(), "{:?}", i.stale);
    }
    for req in [
        Request::AdoptTorn {
            name: "vol".into(),
            epoch,
            regions: vec![u64::MAX],
        },
        Request::RegionAllocated {
            name: "vol".into(),
            region: u64::MAX,
        },
        Request::MarkStale {
            name: "vol".into(),
            epoch,
            node: "n1".into(),
            regions: vec![u64::MAX / 2],
        },
    ] {
        assert!(link.call(&req).is_err(), "{req:?} was accepted");
    }

    // Deleting a replica or a snapshot needs the current writer's epoch.
    n1.call(Request::VolSnapshot {
        name: "vol".into(),
        snap: "s1".into(),
    })
    .unwrap();
    for req in [
        Request::DeleteReplica {
            name: "vol".into(),
            epoch: epoch - 1,
        },
        Request::DeleteSnapshot {
            name: "vol".into(),
            snap: "s1".into(),
            epoch: epoch - 1,
        },
        Request::Snapshot {
            name: "vol".into(),
            snap: "s2".into(),
            epoch: epoch - 1,
        },
    ] {
        let err = link.call(&req).unwrap_err();
        assert!(err.to_string().contains("fenced"), "{req:?}: {err}");
    }
    {
        let i = replica_info(&mut link, "vol");
        assert_eq!(i.snapshots, vec!["s1".to_string()]);
    }

    // The highest epoch there is: the replica takes it (it is newer)...
    link.call(&Request::SetEpoch {
        name: "vol".into(),
        epoch: u64::MAX,
    })
    .unwrap();
    // ...and nobody can go past it: an attach is refused with a clear
    // error instead of wrapping to epoch 0 or panicking.
    detach(&n1);
    let err = n1
        .call(Request::VolAttach {
            name: "vol".into(),
            force: false,
            key: None,
            next_key: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("cannot be raised"), "{err}");
    // Both daemons are still serving.
    assert!(n1.cli(&["show", "vol"]).status.success());
    assert!(n2.cli(&["show", "vol"]).status.success());
}
