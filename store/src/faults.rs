//! Fault injection for the tests of failure paths, on the real binary.
//!
//! Off unless `KILN_STORE_FAULT_DIR` names a directory when the process
//! starts (a warning is logged then). Before each fdatasync/fsync of data
//! or metadata:
//! - if `<dir>/fail-sync` exists, it is removed and the sync fails with
//!   EIO, once, as Linux reports a write-back error once and then forgets
//!   it (a retry would succeed although the data may be gone);
//! - if `<dir>/slow-sync-ms` holds a number, the sync first sleeps that
//!   many milliseconds (a slow disk).
//!
//! And while `<dir>/no-write-batch` exists, the daemon answers a
//! `WriteBatch` request as a kiln-store from before that request does
//! (a message it cannot decode, nothing applied): the newer side of a
//! rolling update.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub const ENV: &str = "KILN_STORE_FAULT_DIR";

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::var_os(ENV).map(PathBuf::from)?;
        tracing::warn!(dir = %d.display(), "fault injection is on ({ENV})");
        Some(d)
    })
    .as_ref()
}

/// Called before every sync of data or metadata.
pub fn before_sync() -> std::io::Result<()> {
    let Some(d) = dir() else { return Ok(()) };
    if let Some(ms) = std::fs::read_to_string(d.join("slow-sync-ms"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if std::fs::remove_file(d.join("fail-sync")).is_ok() {
        tracing::warn!("injected fault: this sync fails with EIO");
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Whether this daemon is to answer `WriteBatch` as one that predates it.
pub fn predates_write_batch() -> bool {
    let Some(d) = dir() else { return false };
    let on = d.join("no-write-batch").exists();
    if on {
        tracing::warn!("injected fault: answering a write batch as an older kiln-store");
    }
    on
}
