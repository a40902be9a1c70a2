//! Hostile input on the node-to-node port from a peer that holds a
//! certificate of the cluster (an unauthenticated one gets nothing: see
//! tls.rs): bad frames close the connection, bad requests get error
//! replies, and the daemon keeps serving.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::*;
use kiln_store::error::WireError;
use kiln_store::proto::{self, Kind, Request, Response};
use kiln_store::transport::{Conn, Connector};

/// A connection to n1 at `addr` as node n2.
fn peer(base: &Path, addr: &str) -> Box<dyn Conn> {
    connector_as(base, "n2").connect("n1", addr).unwrap()
}

fn call(base: &Path, addr: &str, req: &Request) -> Response {
    let mut s = peer(base, addr);
    proto::send(&mut s, Kind::Request, req).unwrap();
    let (k, body) = proto::read_frame(&mut s).unwrap().unwrap();
    assert_eq!(k, Kind::Response);
    proto::decode(&body).unwrap()
}

fn closes(base: &Path, addr: &str, bytes: &[u8]) -> bool {
    let mut s = peer(base, addr);
    s.write_all(bytes).unwrap();
    s.flush().unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn hostile_requests_are_refused_without_harm() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let addr = n1.addr();
    n1.create_volume("vol", "1M", &[&n1]);

    // Garbage, a wrong version, an absurd length: the connection is closed.
    assert!(closes(base, &addr, b"GET / HTTP/1.1\r\n\r\n"));
    let mut h = Vec::new();
    proto::send(&mut h, Kind::Request, &Request::VolList).unwrap();
    let mut v2 = h.clone();
    v2[4] = 2;
    assert!(closes(base, &addr, &v2));
    let mut huge = h.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(closes(base, &addr, &huge));

    // Well-framed but bad requests: error replies.
    let bad = [
        Request::VolList, // control requests are local-only
        Request::Write {
            name: "vol".into(),
            epoch: 2,
            offset: 1 << 20,
            data: vec![0; 4096].into(),
            stale: vec![],
        },
        Request::Write {
            name: "vol".into(),
            epoch: 2,
            offset: 100,
            data: vec![0; 4096].into(),
            stale: vec![],
        },
        Request::Write {
            name: "vol".into(),
            epoch: 2,
            offset: u64::MAX - 4095,
            data: vec![0; 4096].into(),
            stale: vec![],
        },
        Request::Read {
            name: "../../etc".into(),
            offset: 0,
            len: 4096,
        },
        Request::Read {
            name: "vol".into(),
            offset: 0,
            len: u64::MAX,
        },
        Request::Discard {
            name: "vol".into(),
            epoch: 2,
            offset: 0,
            len: u64::MAX,
            stale: vec![],
        },
        Request::MarkStale {
            name: "vol".into(),
            epoch: 2,
            node: "n2".into(),
            regions: vec![1 << 40],
        },
        Request::CreateReplica {
            name: "x".into(),
            size: 12345,
            replicas: vec![],
            epoch: 1,
            crypt: None,
        },
        Request::Write {
            name: "vol".into(),
            epoch: 1, // older than the writer's: fenced
            offset: 0,
            data: vec![0; 4096].into(),
            stale: vec![],
        },
    ];
    for req in &bad {
        match call(base, &addr, req) {
            Response::Err(_) => {}
            r => panic!("{req:?} was accepted: {r:?}"),
        }
    }
    assert!(matches!(
        call(
            base,
            &addr,
            &Request::Write {
                name: "vol".into(),
                epoch: 1,
                offset: 0,
                data: vec![0; 4096].into(),
                stale: vec![],
            }
        ),
        Response::Err(WireError::Fenced { .. })
    ));
    // An undecodable body gets an error reply too.
    let mut s = peer(base, &addr);
    proto::write_frame(&mut s, Kind::Request, &[0xff; 7]).unwrap();
    let (_, body) = proto::read_frame(&mut s).unwrap().unwrap();
    assert!(matches!(
        proto::decode::<Response>(&body).unwrap(),
        Response::Err(_)
    ));

    // Still serving, data intact.
    n1.cli_ok(&["show", "vol"]);
    assert_eq!(n1.replica_read("vol", 0, 4096).data, vec![0u8; 4096]);
}
