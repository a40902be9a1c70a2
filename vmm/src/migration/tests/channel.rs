//! The channel: addresses, authentication, frames.

use super::*;

#[test]
fn a_wrong_secret_is_refused_both_ways() {
    let with = |b: u8| TransportConfig {
        secret: Some(Secret::from_bytes([b; 32])),
        ..quick_transport()
    };
    let cases = [
        (with(1), with(2), "does not know the shared secret"),
        (with(1), quick_transport(), "uses a shared secret"),
        (quick_transport(), with(1), "uses no shared secret"),
    ];
    for (server_cfg, client_cfg, client_msg) in cases {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), &server_cfg).unwrap();
        let addr = l.local_address();
        let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
        let ce = transport::connect(&addr, &client_cfg).unwrap_err();
        let se = server.join().unwrap().unwrap_err();
        assert!(matches!(ce, TransportError::Auth(_)), "{ce}");
        assert!(matches!(se, TransportError::Auth(_)), "{se}");
        let (ce, se) = (ce.to_string(), se.to_string());
        assert!(
            ce.contains(client_msg) || ce.contains("the destination uses"),
            "client: {ce}"
        );
        assert!(!se.is_empty());
    }
    // The same secret on both sides passes.
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), &with(3)).unwrap();
    let addr = l.local_address();
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    transport::connect(&addr, &with(3)).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_source_with_the_wrong_secret_is_refused_by_the_destination() {
    // The destination checks the source's proof, not only the reverse: a
    // client that knows no secret but replays the protocol fails.
    let l = Listener::bind(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        &TransportConfig {
            secret: Some(Secret::from_bytes([4; 32])),
            ..quick_transport()
        },
    )
    .unwrap();
    let Address::Tcp { port, .. } = l.local_address() else {
        unreachable!()
    };
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = b"KILNMIG\x01\x01".to_vec();
    greeting.extend_from_slice(&[0; 32]);
    s.write_all(&greeting).unwrap();
    let mut answer = [0u8; 8 + 1 + 32 + 32];
    s.read_exact(&mut answer).unwrap();
    s.write_all(&[0xab; 32]).unwrap(); // a forged proof
    let e = server.join().unwrap().unwrap_err();
    assert!(
        e.to_string()
            .contains("the source does not know the shared secret"),
        "{e}"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no acceptance byte for a forged proof");
}

#[test]
fn tcp_without_a_secret_stays_on_loopback() {
    let e = Listener::bind(&"tcp:0.0.0.0:0".parse().unwrap(), &quick_transport()).unwrap_err();
    assert!(matches!(e, TransportError::NotLoopback(_)), "{e}");
    // 192.0.2.0/24 is TEST-NET-1: refused before any packet is sent.
    let e =
        transport::connect(&"tcp:192.0.2.1:4444".parse().unwrap(), &quick_transport()).unwrap_err();
    assert!(matches!(e, TransportError::NotLoopback(_)), "{e}");
    assert!(e.to_string().contains("shared secret"), "{e}");
    // With a secret, listening on all addresses is allowed.
    let with = TransportConfig {
        secret: Some(Secret::from_bytes([1; 32])),
        ..quick_transport()
    };
    Listener::bind(&"tcp:0.0.0.0:0".parse().unwrap(), &with).unwrap();
}

#[test]
fn secret_files_are_private_and_exactly_256_bits() {
    let dir = TempDir::new("secret");
    let write = |name: &str, data: &[u8], mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
    let a = Secret::from_file(&write("hex", hex.as_bytes(), 0o600)).unwrap();
    let b = Secret::from_file(&write(
        "raw",
        &[
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
            0xcc, 0xdd, 0xee, 0xff,
        ],
        0o400,
    ))
    .unwrap();
    assert_eq!(format!("{a:?}"), "Secret(..)");
    // Same key: a handshake between them passes.
    let l = Listener::bind(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        &TransportConfig {
            secret: Some(a),
            ..quick_transport()
        },
    )
    .unwrap();
    let addr = l.local_address();
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    transport::connect(
        &addr,
        &TransportConfig {
            secret: Some(b),
            ..quick_transport()
        },
    )
    .unwrap();
    server.join().unwrap().unwrap();

    let e = Secret::from_file(&write("open", hex.as_bytes(), 0o644)).unwrap_err();
    assert!(e.to_string().contains("make it 0600"), "{e}");
    let e = Secret::from_file(&write("short", b"abcd", 0o600)).unwrap_err();
    assert!(e.to_string().contains("256-bit"), "{e}");
    assert!(
        !e.to_string().contains("abcd"),
        "the secret is never printed: {e}"
    );
    assert!(Secret::from_file(&dir.path().join("missing")).is_err());
}

#[test]
fn addresses_parse_with_clear_errors() {
    assert_eq!(
        "unix:/run/x.sock".parse::<Address>().unwrap(),
        Address::Unix("/run/x.sock".into())
    );
    assert_eq!(
        "tcp:10.0.0.2:7000".parse::<Address>().unwrap(),
        Address::Tcp {
            host: "10.0.0.2".into(),
            port: 7000
        }
    );
    let v6: Address = "tcp:[::1]:7000".parse().unwrap();
    assert_eq!(
        v6,
        Address::Tcp {
            host: "::1".into(),
            port: 7000
        }
    );
    assert_eq!(v6.to_string(), "tcp:[::1]:7000");
    for (bad, why) in [
        ("/run/x.sock", "expected unix:/path or tcp:HOST:PORT"),
        ("unix:", "path is empty"),
        ("tcp:host", "a port after"),
        ("tcp::7000", "host is empty"),
        ("tcp:h:70000", "up to 65535"),
        ("tcp:h:http", "up to 65535"),
    ] {
        let e = bad.parse::<Address>().unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_world_writable_socket_directory_is_refused() {
    let dir = TempDir::new("open-dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = Listener::bind(
        &Address::Unix(dir.path().join("m.sock")),
        &quick_transport(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("private directory"), "{e}");
}

fn pair() -> (Connection, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Connection::from_unix_stream(a, Duration::from_secs(20)).unwrap(),
        b,
    )
}

fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

#[test]
fn a_corrupt_frame_fails_its_checksum() {
    let (mut rx, mut tx) = pair();
    let (t, p) = protocol::encode(&Message::Round { n: 7 });
    let good = raw_frame(t, &p);
    tx.write_all(&good).unwrap();
    assert_eq!(protocol::recv(&mut rx).unwrap(), Message::Round { n: 7 });
    for i in [0usize, 5, good.len() - 1] {
        let (mut rx, mut tx) = pair();
        let mut bad = good.clone();
        // Flipping the type byte to another known type, a payload byte or
        // the CRC itself: the checksum catches it.
        bad[i] ^= if i == 0 { 0x0c } else { 0x40 };
        tx.write_all(&bad).unwrap();
        let e = protocol::recv(&mut rx).unwrap_err();
        assert!(
            matches!(
                e,
                protocol::ProtocolError::Transport(TransportError::Checksum { .. })
            ),
            "byte {i}: {e}"
        );
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}

#[test]
fn an_oversize_or_unknown_frame_is_refused_before_its_payload() {
    // Nothing follows the header: reading the payload would wait out the
    // 20 s timeout; refusing it returns at once.
    let (mut rx, mut tx) = pair();
    let mut h = vec![protocol::ty::PAGES];
    h.extend_from_slice(&(transport::MAX_FRAME_LEN + 1).to_le_bytes());
    tx.write_all(&h).unwrap();
    let e = rx.recv_frame(|_| true).unwrap_err();
    assert!(matches!(e, TransportError::Oversize { .. }), "{e}");

    let (mut rx, mut tx) = pair();
    let mut h = vec![0xee];
    h.extend_from_slice(&16u32.to_le_bytes());
    tx.write_all(&h).unwrap();
    let e = protocol::recv(&mut rx).unwrap_err();
    assert!(e.to_string().contains("unknown frame type 238"), "{e}");

    // A frame cut short: closed, not a hang or a panic.
    let (mut rx, mut tx) = pair();
    let f = raw_frame(protocol::ty::STATE, &[1; 100]);
    tx.write_all(&f[..50]).unwrap();
    drop(tx);
    let e = protocol::recv(&mut rx).unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");

    // A sender cannot build an oversize frame either.
    let (mut c, _peer) = pair();
    let big = vec![0u8; transport::MAX_FRAME_LEN as usize + 1];
    assert!(matches!(
        c.send_frame(protocol::ty::STATE, &big),
        Err(TransportError::Oversize { .. })
    ));
}

#[test]
fn a_timeout_is_reported_as_such() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut c = Connection::from_unix_stream(a, Duration::from_millis(50)).unwrap();
    let e = c.recv_frame(|_| true).unwrap_err();
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
}

#[test]
fn transport_throughput_can_be_measured() {
    let bps = transport::unix_throughput(16 * MIB, MIB as usize).unwrap();
    assert!(bps > 0.0);
    eprintln!(
        "migration transport over a unix socket pair: {:.0} MiB/s",
        bps / MIB as f64
    );
}

/// A peer that stops reading in the middle of a frame (a cut link sends
/// no reset): the send gives up at the frame's deadline. The first write
/// fills the socket's buffer and waits out the timeout with part of the
/// frame sent; a second full wait must not follow.
#[test]
fn a_frame_the_peer_stops_reading_fails_at_its_deadline() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let timeout = Duration::from_millis(800);
    let mut conn = Connection::from_unix_stream(ours, timeout).unwrap();
    // Bigger than the socket's buffers, under 1 MiB (no time allowance).
    let frame = vec![0x5au8; 900 << 10];
    let start = std::time::Instant::now();
    let e = conn.send_frame(1, &frame).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    assert!(took >= timeout, "gave up after {took:?}");
    assert!(
        took < timeout * 2 - Duration::from_millis(200),
        "waited the timeout twice: {took:?}"
    );
    drop(theirs);
}
