//! The replication port is mutual TLS: only a peer with a certificate of
//! this cluster's CA is served, a node cannot pose as another, only
//! replica requests are offered to the network (an allow-list), and plain
//! TCP (`--insecure`) is for loopback only. Replication itself runs over
//! TLS in every other multi-node test.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;

use common::*;
use kiln_store::proto::{self, Kind, Request, Response};
use kiln_store::transport::{Conn, Connector, TcpConnector, TlsStream};

fn write_req(data: Vec<u8>, epoch: u64) -> Request {
    Request::Write {
        name: "vol".into(),
        epoch,
        offset: 0,
        data: data.into(),
        stale: vec![],
    }
}

/// Sends `req` on `s` and reads an answer, if the peer gives one.
fn try_call(s: &mut dyn Conn, req: &Request) -> Option<Response> {
    proto::send(s, Kind::Request, req).ok()?;
    let (k, body) = proto::read_frame(s).ok()??;
    assert_eq!(k, Kind::Response);
    proto::decode(&body).ok()
}

fn epoch_of(n: &Node) -> u64 {
    n.info("vol").epoch
}

#[test]
fn only_peers_with_a_certificate_of_the_cluster_are_served() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "1M", &[&n1, &n2]);
    n1.call(Request::VolWrite {
        name: "vol".into(),
        offset: 0,
        data: vec![0x61; 4096],
    })
    .unwrap();
    let before = n2.replica_read("vol", 0, 4096).data;
    let epoch = epoch_of(&n2);

    // The outside check's attack: a bare TCP client writes a block of the
    // non-writer replica at the current epoch. The TLS server takes the
    // frame for a bad handshake and closes; nothing is written.
    let mut bare = TcpStream::connect(n2.addr()).unwrap();
    let mut frame = Vec::new();
    proto::send(
        &mut frame,
        Kind::Request,
        &write_req(vec![0x66; 4096], epoch),
    )
    .unwrap();
    let _ = bare.write_all(&frame);
    let mut buf = [0u8; 64];
    let got = bare.read(&mut buf).unwrap_or(0);
    assert!(
        got == 0 || !buf[..got].starts_with(b"KLNS"),
        "a bare TCP client got a protocol answer"
    );

    // A certificate of another CA (a second `tls init`) is refused.
    let rogue_dir = base.join("rogue");
    kiln_store::pki::init(&rogue_dir, &["n1".into(), "n9".into()]).unwrap();
    let (cert, key) = kiln_store::pki::node_files(&rogue_dir, "n9");
    let rogue = kiln_store::transport::TlsFiles {
        cert,
        key,
        ca: kiln_store::pki::ca_file(&rogue_dir),
    };
    let (rogue_connector, _) = rogue.load(TcpConnector::default()).unwrap();
    // It does not trust n2's certificate either, so it cannot even finish
    // the handshake as a client.
    assert!(rogue_connector.connect("n2", &n2.addr()).is_err());
    // With the right CA to check n2 but its own rogue certificate, the
    // server refuses it.
    let half = kiln_store::transport::TlsFiles {
        ca: tls_files(base, "n2").ca,
        ..rogue.clone()
    };
    let (half_connector, _) = half.load(TcpConnector::default()).unwrap();
    if let Ok(mut s) = half_connector.connect("n2", &n2.addr()) {
        assert!(
            try_call(s.as_mut(), &write_req(vec![0x67; 4096], epoch)).is_none(),
            "a rogue certificate was served"
        );
    }

    // No client certificate at all: refused.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(tls_files(base, "n2").ca).unwrap();
    for c in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpConnector::default().dial(&n2.addr()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "n2".try_into().unwrap()).unwrap();
    let mut anon = TlsStream::new(rustls::StreamOwned::new(conn, tcp)).unwrap();
    assert!(
        try_call(&mut anon, &write_req(vec![0x68; 4096], epoch)).is_none(),
        "a client without a certificate was served"
    );

    // Nothing reached the replica.
    assert_eq!(n2.replica_read("vol", 0, 4096).data, before);
    assert_eq!(epoch_of(&n2), epoch);

    // A node cannot pose as another: dialling "n1" at n2's address fails
    // because n2's certificate names n2.
    let err = connector_as(base, "n1")
        .connect("n1", &n2.addr())
        .err()
        .expect("n2 passed for n1");
    assert!(err.to_string().contains("TLS with node n1"), "{err}");

    // A peer of the cluster gets replica requests served, and nothing
    // else: control requests are not on the allow-list.
    let mut ok = connector_as(base, "n1").connect("n2", &n2.addr()).unwrap();
    assert!(matches!(
        try_call(ok.as_mut(), &Request::ReplicaInfo { name: "vol".into() }),
        Some(Response::Info(_))
    ));
    for req in [
        Request::VolList,
        Request::VolDelete { name: "vol".into() },
        Request::VolAttach {
            name: "vol".into(),
            force: true,
            key: None,
            next_key: None,
        },
        Request::VolExportVhost {
            name: "vol".into(),
            socket: base.join("x.sock").display().to_string(),
        },
        Request::BlockLocation {
            name: "vol".into(),
            block: 0,
        },
    ] {
        match try_call(ok.as_mut(), &req) {
            Some(Response::Err(e)) => {
                assert!(format!("{e:?}").contains("local socket"), "{req:?}: {e:?}")
            }
            other => panic!("{req:?} was served over the network: {other:?}"),
        }
    }
    assert!(n2.cli(&["show", "vol"]).status.success());
    assert!(!base.join("x.sock").exists());
}

#[test]
fn insecure_is_for_loopback_only_and_serve_needs_one_or_the_other() {
    let t = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["serve", "--node-id", "n1", "--data"])
            .arg(t.path().join("d"))
            .arg("--socket")
            .arg(t.path().join("s.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(err.contains("loopback"), "{err}");
    let err = run(&["--listen", "127.0.0.1:0"]);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
    let tls = tls_files(t.path(), "n1");
    let err = run(&[
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--tls-cert",
        tls.cert.to_str().unwrap(),
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    // Nothing was created by the refused starts.
    assert!(!t.path().join("d").exists());

    // On loopback, --insecure serves plain TCP.
    let n = Node::with_args(t.path(), "n1", 1, &["--insecure", "--scrub-rate", "0"]);
    let mut plain: Box<dyn Conn> = TcpConnector::default().connect("n1", &n.addr()).unwrap();
    assert!(matches!(
        try_call(
            plain.as_mut(),
            &Request::ReplicaInfo {
                name: "none".into()
            }
        ),
        Some(Response::Err(_))
    ));
}

#[test]
fn an_idle_peer_connection_is_closed_after_the_idle_timeout() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::with_args(
        base,
        "n1",
        1,
        &["--scrub-rate", "0", "--peer-idle-timeout", "1"],
    );
    let mut link = kiln_store::transport::Link::new(
        connector_as(base, "n2").connect("n1", &n1.addr()).unwrap(),
    );
    let info = Request::ReplicaInfo {
        name: "none".into(),
    };
    // Answered (an error: no such volume) while the link is in use...
    assert!(matches!(
        link.call(&info),
        Err(kiln_store::Error::NotFound(_))
    ));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // ...and closed by the daemon once it sat idle.
    assert!(matches!(
        link.call(&info),
        Err(kiln_store::Error::Unavailable(_))
    ));
    assert!(n1.cli(&["list"]).status.success());
}

#[test]
fn connections_past_the_limit_are_refused_until_places_free_up() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    // Bare connections that never finish a handshake take every place...
    let hogs: Vec<TcpStream> = (0..kiln_store::server::MAX_PEER_CONNECTIONS)
        .map(|_| TcpStream::connect(n1.addr()).unwrap())
        .collect();
    let peer = connector_as(base, "n2");
    let info = Request::ReplicaInfo {
        name: "none".into(),
    };
    // ...so a real peer is refused (closed before or during its handshake)...
    common::wait_until(
        "the daemon has seen every hog",
        std::time::Duration::from_secs(10),
        || match peer.connect("n1", &n1.addr()) {
            Err(_) => true,
            Ok(mut c) => try_call(c.as_mut(), &info).is_none(),
        },
    );
    // ...until they go away.
    drop(hogs);
    common::wait_until(
        "a place is free again",
        std::time::Duration::from_secs(10),
        || {
            peer.connect("n1", &n1.addr())
                .ok()
                .and_then(|mut c| try_call(c.as_mut(), &info))
                .is_some()
        },
    );
}

/// A frame's header and body go out in one vectored write, one TLS record
/// (rustls's own stream would take the header alone, a record of 16
/// bytes, and leave the body for a second record and system call).
#[test]
fn a_frame_is_one_tls_record_written_at_once() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let n1 = Node::new(base, "n1", 1);
    let n2 = Node::new(base, "n2", 1);
    n1.create_volume("vol", "1M", &[&n1, &n2]);
    let mut s = connector_as(base, "n1").connect("n2", &n2.addr()).unwrap();
    let (header, body) = ([0x4bu8; 16], [0x61u8; 4096]);
    let n = s
        .write_vectored(&[std::io::IoSlice::new(&header), std::io::IoSlice::new(&body)])
        .unwrap();
    assert_eq!(n, header.len() + body.len());
    // And a real request still gets its answer on such a link.
    let mut s = connector_as(base, "n1").connect("n2", &n2.addr()).unwrap();
    let epoch = epoch_of(&n2);
    assert!(try_call(s.as_mut(), &write_req(vec![0x62; 4096], epoch)).is_some());
    assert_eq!(n2.replica_read("vol", 0, 4096).data, vec![0x62; 4096]);
}
