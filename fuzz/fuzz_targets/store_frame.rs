//! kiln-store's network protocol as a peer sends it: frames read from the
//! raw input (header checks, lengths, checksums), and message bodies
//! decoded as each frame kind (`Request`, `Response`, `Progress`), also
//! wrapped in valid frames so the fuzzer gets past the checksum.

#![no_main]

use kiln_store::proto::{decode, read_frame, send, write_frame, Kind, Progress, Request, Response};
use libfuzzer_sys::fuzz_target;

/// Decodes `body` as a `kind` frame's message; a message that decodes is
/// encoded again, and must then read back to the same bytes.
fn decode_as(kind: Kind, body: &[u8]) {
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(kind: Kind, msg: &T) {
        let mut wire = Vec::new();
        send(&mut wire, kind, msg).expect("a decoded message encodes");
        let (k, body) = read_frame(&mut wire.as_slice())
            .expect("a frame we wrote reads back")
            .expect("not the end of the stream");
        assert_eq!(k, kind);
        let msg: T = decode(&body).expect("an encoded message decodes");
        let mut wire2 = Vec::new();
        send(&mut wire2, kind, &msg).unwrap();
        assert_eq!(wire, wire2, "decode and encode are not inverse");
    }
    match kind {
        Kind::Request => {
            if let Ok(r) = decode::<Request>(body) {
                // Exercised on every decoded request: the network allow-list.
                let _ = r.is_replica_op();
                again(kind, &r);
            }
        }
        Kind::Response => {
            if let Ok(r) = decode::<Response>(body) {
                again(kind, &r);
            }
        }
        Kind::Progress => {
            if let Ok(p) = decode::<Progress>(body) {
                again(kind, &p);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // A stream of frames exactly as a connection delivers it.
    let mut stream = data;
    while let Ok(Some((kind, body))) = read_frame(&mut stream) {
        decode_as(kind, &body);
    }
    // The same bytes as a body of each kind, inside a valid frame.
    for kind in [Kind::Request, Kind::Response, Kind::Progress] {
        let mut wire = Vec::new();
        write_frame(&mut wire, kind, data).expect("small frames are written");
        let (k, body) = read_frame(&mut wire.as_slice()).unwrap().unwrap();
        assert_eq!((k, body.as_slice()), (kind, data));
        decode_as(kind, data);
    }
});
