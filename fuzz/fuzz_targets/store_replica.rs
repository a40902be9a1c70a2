//! kiln-store's replica request handler (`replica::handle`), which serves
//! what other nodes send, run on every request the input decodes to that
//! the network may send (`Request::is_replica_op`), against a real engine
//! in a scratch directory (`$TMPDIR/kiln-fuzz-replica-PID`, kept for the
//! whole fuzzing process: the requests build on each other's volumes).
//! The peers a scrub would repair from are unreachable.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_store::error::{Error, Result};
use kiln_store::proto::{decode, Request, Response};
use kiln_store::transport::{Conn, Connector};
use kiln_store::{replica, Engine};
use libfuzzer_sys::fuzz_target;

struct NoPeers;

impl Connector for NoPeers {
    fn connect(&self, node: &str, _addr: &str) -> Result<Box<dyn Conn>> {
        Err(Error::Unavailable(format!("fuzzing: no peer {node}")))
    }
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("kiln-fuzz-replica-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Engine::open("fuzz-node", &[dir]).expect("engine in a scratch directory")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode::<Request>(data) else {
        return;
    };
    if !req.is_replica_op() {
        return;
    }
    let resp = replica::handle(engine(), &NoPeers, &req);
    // A read that succeeds answers with exactly the bytes asked for.
    if let (Request::Read { len, .. }, Response::Read(out)) = (&req, &resp) {
        assert_eq!(out.data.len() as u64, *len, "a short or long read");
    }
});
