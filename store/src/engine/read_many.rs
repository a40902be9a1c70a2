//! Many reads of one volume at once: every block and sidecar read of the
//! batch submitted to the disk together ([`super::uring::read_all`]), where
//! [`Engine::read`] reads one range with two synchronous `pread`s. A guest
//! at queue depth has many random 4 KiB reads waiting at a time; served
//! one after another each waits for the disk on its own.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::blocks::{is_block_aligned, sidecar_at, sidecar_len, verify_blocks};
use super::uring::{read_all, Read};
use super::{Engine, ReadOut};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;
use crate::{BLOCKS_PER_EXTENT, BLOCK_SIZE, EXTENT_SIZE, MAX_IO};

/// The part of one range that lies in one mapped extent.
struct Piece {
    /// Which range of the batch.
    range: usize,
    /// Byte position in the range, and length.
    pos: usize,
    len: usize,
    /// Extent index in the volume and first block in it.
    idx: u64,
    b0: u64,
    file: Arc<File>,
    direct: Option<Arc<File>>,
    base: u64,
}

impl Engine {
    /// [`Engine::read`] of each of `ranges` (offset, length), their disk
    /// reads submitted together. Each range has its own outcome: one out of
    /// bounds, or whose disk read failed, does not fail the others.
    pub fn read_many(&self, name: &str, ranges: &[(u64, u64)]) -> Vec<Result<ReadOut>> {
        // Each range's buffer, or why it cannot be read.
        let mut out: Vec<Result<IoBuf>> = Vec::with_capacity(ranges.len());
        let mut pieces = Vec::new();
        let reading;
        {
            let mut st = self.lock();
            let (size, map) = match Self::vol(&st, name) {
                Ok(rec) => (rec.size, rec.map),
                Err(e) => return vec![Err(e); ranges.len()],
            };
            for (r, &(offset, len)) in ranges.iter().enumerate() {
                if let Err(e) = Self::check_range(size, offset, len, MAX_IO) {
                    out.push(Err(e));
                    continue;
                }
                let mut pos = 0u64;
                let mut failed = None;
                let first_piece = pieces.len();
                while pos < len {
                    let abs = offset + pos;
                    let idx = abs / EXTENT_SIZE;
                    let n = (len - pos).min((idx + 1) * EXTENT_SIZE - abs);
                    if let Some(id) = st.maps.get(&(map, idx)).copied() {
                        match self.locate(&mut st, id) {
                            Ok((file, base, key)) => pieces.push(Piece {
                                range: r,
                                pos: pos as usize,
                                len: n as usize,
                                idx,
                                b0: (abs - idx * EXTENT_SIZE) / BLOCK_SIZE,
                                direct: self.direct_slab(&mut st, key),
                                file,
                                base,
                            }),
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    pos += n;
                }
                match failed {
                    Some(e) => {
                        pieces.truncate(first_piece);
                        out.push(Err(e));
                    }
                    None => out.push(Ok(IoBuf::zeroed(len as usize))),
                }
            }
            // Taken before the node lock goes: no slot located above can
            // be given to another extent until these reads are done.
            reading = self.reading.read().expect(crate::POISONED);
        }
        let mut sides: Vec<Vec<u8>> = pieces
            .iter()
            .map(|p| vec![0u8; sidecar_len(p.len)])
            .collect();
        // Each piece's sidecar entries and data, as slices of the buffers
        // (pieces of one range are in order and do not overlap).
        let mut datas: Vec<&mut [u8]> = Vec::with_capacity(pieces.len());
        {
            let mut rest: Vec<(usize, &mut [u8])> = out
                .iter_mut()
                .map(|o| match o {
                    Ok(o) => (0, &mut o[..]),
                    Err(_) => (0, &mut [][..]),
                })
                .collect();
            for p in &pieces {
                let (at, buf) = &mut rest[p.range];
                let tail = std::mem::take(buf);
                let (_, tail) = tail.split_at_mut(p.pos - *at);
                let (mine, tail) = tail.split_at_mut(p.len);
                *buf = tail;
                *at = p.pos + p.len;
                datas.push(mine);
            }
        }
        let mut reads: Vec<Read> = Vec::with_capacity(pieces.len() * 2);
        let mut via_direct = Vec::with_capacity(pieces.len());
        for ((p, side), data) in pieces.iter().zip(&mut sides).zip(&mut datas) {
            reads.push(Read {
                file: &p.file,
                buf: side,
                at: sidecar_at(p.base, p.b0),
            });
            let direct = p.direct.as_deref().filter(|_| is_block_aligned(data));
            via_direct.push(direct.is_some());
            reads.push(Read {
                file: direct.unwrap_or(&p.file),
                buf: data,
                at: p.base + p.b0 * BLOCK_SIZE,
            });
        }
        // The sidecar entry of each block is read in the same submission as
        // its data; which lands first does not matter here, as the range's
        // ticket (the writer's) keeps writes of these blocks out meanwhile.
        let done = read_all(&mut reads);
        drop(reads);
        let mut failed: Vec<Option<Error>> = vec![None; ranges.len()];
        let mut bad_blocks: Vec<Vec<u64>> = vec![Vec::new(); ranges.len()];
        for (k, p) in pieces.iter().enumerate() {
            let data = &mut *datas[k];
            if let Err(e) = &done[2 * k] {
                failed[p.range].get_or_insert_with(|| Error::Io(e.to_string()));
                continue;
            }
            if let Err(e) = &done[2 * k + 1] {
                // A file system may refuse a direct read it accepted at
                // open; the page cache still serves it.
                let again = via_direct[k].then(|| {
                    std::os::unix::fs::FileExt::read_exact_at(
                        &*p.file,
                        data,
                        p.base + p.b0 * BLOCK_SIZE,
                    )
                });
                match again {
                    Some(Ok(())) => {}
                    _ => {
                        failed[p.range].get_or_insert_with(|| Error::Io(e.to_string()));
                        continue;
                    }
                }
            }
            let first = p.idx * BLOCKS_PER_EXTENT + p.b0;
            let bad = verify_blocks(&sides[k], data);
            bad_blocks[p.range].extend(bad.iter().map(|b| first + b));
        }
        drop(datas);
        drop(reading);
        out.into_iter()
            .zip(failed)
            .zip(bad_blocks)
            .map(|((data, failed), bad_blocks)| {
                let data = data?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.metrics
                    .checksum_errors
                    .fetch_add(bad_blocks.len() as u64, Ordering::Relaxed);
                Ok(ReadOut { data, bad_blocks })
            })
            .collect()
    }
}
