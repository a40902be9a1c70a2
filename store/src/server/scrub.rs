//! The daemon's background scrub: every local replica at a set rate, then,
//! where the daemon is the writer, the replicas compared with each other.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Daemon;
use crate::replica;

/// Scrubs every local replica forever at about `rate` bytes per second.
/// Where this node is a volume's writer, its replicas are then compared
/// with each other at the same rate.
pub(super) fn background_scrub(daemon: Weak<Daemon>, rate: u64, pause: Duration) {
    loop {
        std::thread::sleep(pause);
        let Some(d) = daemon.upgrade() else { return };
        for v in d.engine.list() {
            let start = Instant::now();
            let mut done_bytes = 0u64;
            let mut pace = |bytes: u64| {
                done_bytes += bytes;
                let due = Duration::from_secs_f64(done_bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            };
            let r =
                replica::scrub_and_repair(&d.engine, d.connector.as_ref(), &v.name, &mut |_, _| {
                    pace(crate::EXTENT_SIZE)
                });
            if let Ok(w) = d.writer(&v.name) {
                let mut last = 0;
                match crate::verify::compare_replicas(&w, &mut |done, _| {
                    pace((done - last) * crate::EXTENT_SIZE);
                    last = done;
                }) {
                    Ok(c) if c.diverged > 0 => tracing::warn!(
                        volume = %v.name,
                        regions = c.diverged,
                        "background scrub found replicas that differed and copied the writer's regions over them"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(volume = %v.name, error = %e, "replica comparison skipped")
                    }
                }
            }
            match r {
                Ok(rep) if !rep.bad_blocks.is_empty() => tracing::warn!(
                    volume = %v.name,
                    bad = rep.bad_blocks.len(),
                    repaired = rep.repaired,
                    "background scrub found bad blocks"
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!(volume = %v.name, error = %e, "background scrub skipped"),
            }
        }
    }
}
