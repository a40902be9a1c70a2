//! Kiln's own measurements: its binaries and configuration into
//! `KILN_SOFTWARE_PCR` at start (the weaker mode where IMA is missing, and
//! always the PCR the key-encryption key is sealed to), and every VM launch
//! into `VM_LAUNCH_PCR`, with the event log that explains both.
//!
//! The log lives in the run directory, which a reboot empties as it resets
//! the PCRs. Within one boot a restarted agent extends a file again only
//! when its digest changed since it was last measured, so restarting the
//! same binaries leaves the PCR where it was, and replacing one moves it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::attest::{KilnEvent, KilnLogEntry, KILN_SOFTWARE_PCR, VM_LAUNCH_PCR};

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// PCR extend in software: SHA-256(old || digest).
pub fn extend(old: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

/// What a log's entries for `pcr` extend a zeroed PCR to.
pub fn replay(log: &[KilnLogEntry], pcr: u8) -> [u8; 32] {
    let mut v = [0u8; 32];
    for e in log.iter().filter(|e| e.pcr == pcr) {
        v = extend(&v, &e.event.digest());
    }
    v
}

/// A file Kiln measures, with its digest now.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    pub path: String,
    pub sha256: String,
}

/// Kiln's software in a fixed order: the programs, then the configuration
/// that decides whom the node trusts. Missing files are skipped (kiln-vmm
/// may live elsewhere on a node that runs no VMs).
pub fn software(programs: &[PathBuf], config: &[PathBuf]) -> std::io::Result<Vec<Measured>> {
    let mut out = Vec::new();
    for p in programs.iter().chain(config) {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if !p.is_file() {
            continue;
        }
        out.push(Measured {
            path: p.display().to_string(),
            sha256: hex::encode(sha256_file(&p)?),
        });
    }
    Ok(out)
}

fn file_event(m: &Measured) -> KilnEvent {
    KilnEvent::File {
        path: m.path.clone(),
        sha256: m.sha256.clone(),
    }
}

/// `KILN_SOFTWARE_PCR` after a fresh boot that measured `files`.
pub fn predicted_boot_value(files: &[Measured]) -> [u8; 32] {
    files
        .iter()
        .fold([0u8; 32], |v, m| extend(&v, &file_event(m).digest()))
}

/// The files whose digest differs between `then` (at sealing) and `now`,
/// as "path: sealed to X, now Y" (or missing / new).
pub fn changed_files(then: &[Measured], now: &[Measured]) -> Vec<String> {
    let a: BTreeMap<&str, &str> = then
        .iter()
        .map(|m| (m.path.as_str(), m.sha256.as_str()))
        .collect();
    let b: BTreeMap<&str, &str> = now
        .iter()
        .map(|m| (m.path.as_str(), m.sha256.as_str()))
        .collect();
    let mut out = Vec::new();
    for (p, d) in &a {
        match b.get(p) {
            Some(n) if n == d => {}
            Some(n) => out.push(format!("{p}: sealed to sha256 {d}, now {n}")),
            None => out.push(format!("{p}: sealed to sha256 {d}, now missing")),
        }
    }
    for (p, n) in &b {
        if !a.contains_key(p) {
            out.push(format!("{p}: not measured at sealing, now sha256 {n}"));
        }
    }
    out
}

/// The event log file (JSON lines).
pub struct EventLog {
    path: PathBuf,
    entries: Vec<KilnLogEntry>,
}

impl EventLog {
    /// Loads the log of this boot. `pcrs` are the current values of the two
    /// Kiln PCRs: a log that does not replay to them is from an earlier
    /// boot (PCRs zero) and is started over, or was tampered with, which
    /// is kept as found so that a verifier sees it.
    pub fn load(path: &Path, pcrs: &BTreeMap<u8, [u8; 32]>) -> EventLog {
        let entries: Vec<KilnLogEntry> = std::fs::read_to_string(path)
            .ok()
            .map(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        let zero = [0u8; 32];
        let all_zero = [KILN_SOFTWARE_PCR, VM_LAUNCH_PCR]
            .iter()
            .all(|p| pcrs.get(p) == Some(&zero));
        let replays = [KILN_SOFTWARE_PCR, VM_LAUNCH_PCR]
            .iter()
            .all(|p| pcrs.get(p) == Some(&replay(&entries, *p)));
        let entries = if all_zero && !replays {
            tracing::info!("a new boot: Kiln's event log starts over");
            let _ = std::fs::remove_file(path);
            Vec::new()
        } else {
            if !replays {
                tracing::warn!(
                    "Kiln's event log {} does not replay to PCRs {KILN_SOFTWARE_PCR} and {VM_LAUNCH_PCR}: something else extended them",
                    path.display()
                );
            }
            entries
        };
        EventLog {
            path: path.to_path_buf(),
            entries,
        }
    }

    pub fn entries(&self) -> &[KilnLogEntry] {
        &self.entries
    }

    /// The digest last logged for a file, if any.
    fn last_digest(&self, path: &str) -> Option<&str> {
        self.entries.iter().rev().find_map(|e| match &e.event {
            KilnEvent::File { path: p, sha256 } if p == path => Some(sha256.as_str()),
            _ => None,
        })
    }

    /// The software events still to extend: files not measured in this boot
    /// or changed since.
    pub fn pending_software(&self, files: &[Measured]) -> Vec<KilnLogEntry> {
        files
            .iter()
            .filter(|m| self.last_digest(&m.path) != Some(m.sha256.as_str()))
            .map(|m| entry(KILN_SOFTWARE_PCR, file_event(m)))
            .collect()
    }

    /// Appends an entry after its digest was extended (write first, so a
    /// crash leaves the log ahead of the PCR rather than silent).
    pub fn append(&mut self, e: KilnLogEntry) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut line = serde_json::to_vec(&e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        self.entries.push(e);
        Ok(())
    }
}

pub fn entry(pcr: u8, event: KilnEvent) -> KilnLogEntry {
    KilnLogEntry {
        pcr,
        digest: hex::encode(event.digest()),
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, d: &str) -> Measured {
        Measured {
            path: p.into(),
            sha256: d.into(),
        }
    }

    #[test]
    fn a_log_replays_like_the_tpm_extends() {
        let files = [m("/a", "01"), m("/b", "02")];
        let log: Vec<KilnLogEntry> = files
            .iter()
            .map(|f| entry(KILN_SOFTWARE_PCR, file_event(f)))
            .collect();
        assert_eq!(
            replay(&log, KILN_SOFTWARE_PCR),
            predicted_boot_value(&files)
        );
        assert_eq!(replay(&log, VM_LAUNCH_PCR), [0u8; 32]);
        let by_hand = extend(
            &extend(&[0; 32], &file_event(&files[0]).digest()),
            &file_event(&files[1]).digest(),
        );
        assert_eq!(predicted_boot_value(&files), by_hand);
    }

    #[test]
    fn only_changed_files_are_measured_again_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let files = vec![m("/a", "01"), m("/b", "02")];
        let mut pcrs = BTreeMap::from([(KILN_SOFTWARE_PCR, [0u8; 32]), (VM_LAUNCH_PCR, [0u8; 32])]);
        let mut log = EventLog::load(&path, &pcrs);
        for e in log.pending_software(&files) {
            log.append(e).unwrap();
        }
        pcrs.insert(KILN_SOFTWARE_PCR, predicted_boot_value(&files));
        let log = EventLog::load(&path, &pcrs);
        assert_eq!(log.entries().len(), 2, "the same boot keeps its log");
        assert!(log.pending_software(&files).is_empty());
        let now = vec![m("/a", "09"), m("/b", "02")];
        let pending = log.pending_software(&now);
        assert_eq!(pending.len(), 1);
        assert_eq!(
            changed_files(&files, &now),
            vec!["/a: sealed to sha256 01, now 09".to_string()]
        );
        // A reboot: PCRs are zero again, the old log is dropped.
        pcrs.insert(KILN_SOFTWARE_PCR, [0u8; 32]);
        assert!(EventLog::load(&path, &pcrs).entries().is_empty());
    }
}
