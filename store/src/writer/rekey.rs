//! Online rekey: re-encrypting an attached volume with a new key while it
//! serves I/O.
//!
//! Region by region, with the writer's I/O gate held exclusively (so no
//! guest write is in flight, and none races it):
//! read the region's ciphertext, record on every replica the watermark and
//! a fingerprint of each block's old ciphertext (the "hot" region, durably),
//! re-encrypt every block that is not a hole (old key → new key), write it
//! to every replica, flush, and move the watermark past it. Blocks below
//! the watermark are under the new key, blocks above it under the old one.
//! After a crash, attach (with both keys) settles the hot region first:
//! a block whose ciphertext still has its recorded fingerprint is old, any
//! other is new (like LUKS2's checksum resilience). At the end every
//! replica records the new key's check alone and the old one is forgotten.
//!
//! Snapshots hold blocks under the key they were taken with, so a volume
//! with snapshots is not rekeyed (and no snapshot is taken during one).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{keys, Inner, Keys, PeerState, Writer};
use crate::crypt::{is_zero, VolumeKey};
use crate::error::{Error, Result};
use crate::proto::{Request, Response};
use crate::types::{CryptRec, HotRegion};
use crate::{BLOCK_SIZE, EXTENT_SIZE};

/// A block's ciphertext fingerprint (0 for a hole).
fn fingerprint(block: &[u8]) -> u64 {
    if is_zero(block) {
        return 0;
    }
    let d = Sha256::digest(block);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

impl Writer {
    pub(crate) fn refuse_during_rekey(&self, what: &str) -> Result<()> {
        let inner = self.lock();
        if let Some(r) = inner.crypt.as_ref().and_then(|c| c.rec.rekey.as_ref()) {
            return Err(Error::Invalid(format!(
                "{} is being rekeyed (to key check {}); {what} wait until it is done",
                self.name, r.next_key_check
            )));
        }
        Ok(())
    }

    /// Do `keys` fit this attached volume? (An attach request for a volume
    /// attached already.)
    pub fn accepts(&self, keys: &Keys) -> Result<()> {
        let inner = self.lock();
        match &inner.crypt {
            Some(c) => c.accepts(&self.name, keys),
            None => keys::check_keys(&self.name, None, keys.key.as_ref(), keys.next_key.as_ref()),
        }
    }

    /// A copy of the volume's key (for a clone, which shares it).
    pub fn key_copy(&self) -> Result<Option<VolumeKey>> {
        let inner = self.lock();
        Ok(match &inner.crypt {
            Some(c) => Some(c.cur.key.try_clone()?),
            None => None,
        })
    }

    /// Records `rec` on every replica that gets writes; one that fails is
    /// marked stale (its resync ends with the record).
    fn set_crypt_all(&self, inner: &mut Inner, rec: &CryptRec) -> Result<()> {
        let req = Request::SetCrypt {
            name: self.name.clone(),
            epoch: self.epoch,
            crypt: rec.clone(),
        };
        for i in 0..inner.peers.len() {
            if inner.peers[i].state == PeerState::Stale {
                continue;
            }
            match self.peer_call(inner, i, &req) {
                Ok(_) => {}
                Err(e @ Error::Fenced { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(volume = %self.name, peer = %inner.peers[i].node, error = %e, "cannot record the encryption state; marking the replica stale");
                    self.mark_stale(inner, vec![i], &[])?;
                }
            }
        }
        if let Some(c) = inner.crypt.as_mut() {
            c.rec = rec.clone();
        }
        Ok(())
    }

    /// Sends the volume's encryption record to replica `i` (one that comes
    /// back in sync).
    pub(crate) fn send_crypt(&self, inner: &mut Inner, i: usize) -> Result<()> {
        let Some(rec) = inner.crypt.as_ref().map(|c| c.rec.clone()) else {
            return Ok(());
        };
        self.peer_call(
            inner,
            i,
            &Request::SetCrypt {
                name: self.name.clone(),
                epoch: self.epoch,
                crypt: rec,
            },
        )
        .map(|_| ())
    }

    /// At attach: makes every replica record the encryption state of the
    /// one attach chose, and finishes a region an interrupted rekey left
    /// half re-encrypted.
    pub(crate) fn settle_rekey(&self, inner: &mut Inner) -> Result<()> {
        let Some(rec) = inner.crypt.as_ref().map(|c| c.rec.clone()) else {
            return Ok(());
        };
        self.set_crypt_all(inner, &rec)?;
        let hot = rec.rekey.as_ref().and_then(|r| r.hot.clone());
        if let Some(hot) = hot {
            tracing::info!(volume = %self.name, region = hot.region, "finishing the region an interrupted rekey was re-encrypting");
            self.rekey_region(inner, hot.region, Some(&hot.old))?;
            let mut rec = inner
                .crypt
                .as_ref()
                .map(|c| c.rec.clone())
                .expect("encrypted");
            if let Some(r) = rec.rekey.as_mut() {
                r.watermark = (hot.region + 1) * EXTENT_SIZE;
                r.hot = None;
            }
            self.set_crypt_all(inner, &rec)?;
        }
        Ok(())
    }

    /// Starts re-encrypting the volume with `key` (see the module doc);
    /// [`Writer::spawn_rekey`] then runs it.
    pub fn begin_rekey(&self, key: VolumeKey) -> Result<()> {
        self.check_usable()?;
        let _quiet = self.quiesce();
        let mut inner = self.lock();
        let Some(c) = inner.crypt.as_ref() else {
            return Err(Error::Invalid(format!(
                "{} is not encrypted; only an encrypted volume is rekeyed",
                self.name
            )));
        };
        if let Some(r) = &c.rec.rekey {
            return Err(Error::Invalid(format!(
                "{} is being rekeyed already (to key check {})",
                self.name, r.next_key_check
            )));
        }
        let src = Self::source(&inner)?;
        let info = match self.peer_call(
            &mut inner,
            src,
            &Request::ReplicaInfo {
                name: self.name.clone(),
            },
        )? {
            Response::Info(i) => i,
            _ => return Err(Error::Protocol("unexpected reply to info".into())),
        };
        if !info.snapshots.is_empty() {
            return Err(Error::Invalid(format!(
                "{} has snapshots ({}), whose blocks stay under the old key: delete them \
                 before a rekey",
                self.name,
                info.snapshots.join(", ")
            )));
        }
        let c = inner.crypt.as_mut().expect("checked above");
        c.begin_rekey(key)?;
        let rec = c.rec.clone();
        if let Err(e) = self.set_crypt_all(&mut inner, &rec) {
            // Nothing was re-encrypted: drop the rekey (a replica that did
            // record it is told otherwise at the next attach).
            if let Some(c) = inner.crypt.as_mut() {
                c.next = None;
                c.rec.rekey = None;
            }
            return Err(e);
        }
        tracing::info!(volume = %self.name, "rekey started");
        Ok(())
    }

    /// Runs the volume's rekey, if one is in progress, in a thread of its
    /// own until it is done (or the writer stops).
    pub fn spawn_rekey(self: &Arc<Self>) -> Result<()> {
        if self.lock().crypt.as_ref().is_none_or(|c| c.next.is_none()) {
            return Ok(());
        }
        if self.rekeying.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let w = self.clone();
        std::thread::Builder::new()
            .name(format!("rekey-{}", self.name))
            .spawn(move || {
                while !w.is_detached() && !w.is_fenced() {
                    match w.rekey_step() {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(volume = %w.name, error = %e, "rekey step failed; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
                w.rekeying.store(false, Ordering::SeqCst);
            })?;
        Ok(())
    }

    /// Re-encrypts the next region; `true` when the rekey is complete.
    fn rekey_step(&self) -> Result<bool> {
        self.check_usable()?;
        // No guest write in flight while a region is re-encrypted (nor
        // while the watermark moves).
        let _quiet = self.quiesce();
        let mut inner = self.lock();
        let Some(c) = inner.crypt.as_ref() else {
            return Ok(true);
        };
        let Some(next) = c.next.as_ref() else {
            return Ok(true);
        };
        if c.watermark >= inner.size {
            let done = CryptRec {
                key_check: next.cipher.check().to_string(),
                rekey: None,
            };
            self.set_crypt_all(&mut inner, &done)?;
            if let Some(c) = inner.crypt.as_mut() {
                c.finish_rekey();
            }
            tracing::info!(volume = %self.name, key_check = %done.key_check, "rekey complete");
            return Ok(true);
        }
        let r = c.watermark / EXTENT_SIZE;
        self.rekey_region(&mut inner, r, None)?;
        Ok(false)
    }

    /// The in-sync replica to read from (this node's first).
    fn source(inner: &Inner) -> Result<usize> {
        (0..inner.peers.len())
            .filter(|i| inner.peers[*i].state == PeerState::InSync)
            .min_by_key(|i| !inner.peers[*i].local_engine())
            .ok_or_else(|| Error::Unavailable("no in-sync replica".into()))
    }

    /// Re-encrypts region `r` (old key → new key) and moves the watermark
    /// past it. `settling`: the fingerprints recorded before a crash; only
    /// blocks that still match them are old.
    fn rekey_region(&self, inner: &mut Inner, r: u64, settling: Option<&[u64]>) -> Result<()> {
        let start = r * EXTENT_SIZE;
        let end = (start + EXTENT_SIZE).min(inner.size);
        if start < end {
            let src = Self::source(inner)?;
            if self.region_allocated(inner, src, r)? {
                self.reencrypt(inner, r, start, end - start, settling)?;
            }
        }
        if let Some(c) = inner.crypt.as_mut() {
            c.watermark = c.watermark.max(end.next_multiple_of(EXTENT_SIZE));
        }
        Ok(())
    }

    fn reencrypt(
        &self,
        inner: &mut Inner,
        r: u64,
        start: u64,
        len: u64,
        settling: Option<&[u64]>,
    ) -> Result<()> {
        let mut data = self.read_raw(inner, start, len)?;
        let bs = BLOCK_SIZE as usize;
        let prints: Vec<u64> = data.chunks_exact(bs).map(fingerprint).collect();
        let old: Vec<u64> = match settling {
            Some(old) => old.to_vec(),
            None => {
                // Durably, on every replica, before any block changes.
                let mut rec = inner
                    .crypt
                    .as_ref()
                    .map(|c| c.rec.clone())
                    .ok_or_else(|| Error::Invalid("not encrypted".into()))?;
                if let Some(rk) = rec.rekey.as_mut() {
                    rk.watermark = start;
                    rk.hot = Some(HotRegion {
                        region: r,
                        old: prints.clone(),
                    });
                }
                self.set_crypt_all(inner, &rec)?;
                prints.clone()
            }
        };
        let c = inner
            .crypt
            .as_ref()
            .ok_or_else(|| Error::Invalid("not encrypted".into()))?;
        let next = c
            .next
            .as_ref()
            .ok_or_else(|| Error::Invalid("no rekey in progress".into()))?;
        for (i, blk) in data.chunks_exact_mut(bs).enumerate() {
            let fp = prints[i];
            // A hole stays a hole; a block already under the new key (only
            // after a crash, or written since) stays as it is.
            if fp == 0 || old.get(i) != Some(&fp) {
                continue;
            }
            let at = start + (i * bs) as u64;
            c.cur.cipher.decrypt(blk, at)?;
            next.cipher.encrypt(blk, at)?;
        }
        self.write_raw(inner, start, data)?;
        self.flush_locked(inner)
    }
}
