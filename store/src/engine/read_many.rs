//! Many reads of one volume at once: every block and sidecar read of the
//! batch submitted to the disk together ([`super::uring::read_each`]),
//! where [`Engine::read`] reads one range with two synchronous `pread`s. A
//! guest at queue depth has many random 4 KiB reads waiting at a time;
//! served one after another each waits for the disk on its own. Each range
//! is handed back as soon as its own reads have landed, so the caller can
//! pass it on while slower ones of the batch are still at the disk.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::blocks::{is_block_aligned, sidecar_at, sidecar_len, verify_blocks};
use super::uring::{read_each, Finished, Read};
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
    /// Its sidecar entries and data once read (or why not).
    side: Option<Result<IoBuf>>,
    data: Option<Result<IoBuf>>,
}

/// A range of the batch on its way: the pieces not yet verified, what is
/// known of it so far.
struct Range {
    len: usize,
    /// Pieces still at the disk.
    waiting: usize,
    /// Verified pieces: position in the range and data.
    got: Vec<(usize, IoBuf)>,
    bad_blocks: Vec<u64>,
    failed: Option<Error>,
}

impl Range {
    /// What the range reads as, its pieces all in: a single piece that
    /// covers it is the answer as it is; otherwise the pieces go into a
    /// buffer of zeros (the unmapped parts).
    fn finish(self) -> Result<IoBuf> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut got = self.got;
        if got.len() == 1 && got[0].0 == 0 && got[0].1.len() == self.len {
            return Ok(got.pop().expect("one piece").1);
        }
        let mut out = IoBuf::zeroed(self.len);
        for (pos, data) in got {
            out[pos..pos + data.len()].copy_from_slice(&data);
        }
        Ok(out)
    }
}

impl Engine {
    /// [`Engine::read`] of each of `ranges` (offset, length), their disk
    /// reads submitted together. Each range has its own outcome: one out of
    /// bounds, or whose disk read failed, does not fail the others.
    pub fn read_many(&self, name: &str, ranges: &[(u64, u64)]) -> Vec<Result<ReadOut>> {
        let mut out: Vec<Option<Result<ReadOut>>> = (0..ranges.len()).map(|_| None).collect();
        self.read_many_each(name, ranges, |round| {
            for (i, r) in round {
                out[i] = Some(r);
            }
        });
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::Io("a read of the batch was lost".into()))))
            .collect()
    }

    /// [`Engine::read_many`], each range handed to `done` as soon as it is
    /// read and verified (in rounds: each call gets the ranges finished
    /// since the previous one, with their index in `ranges`). Every range
    /// is reported exactly once. `done` runs while the batch holds the
    /// engine's read guard (slots it reads are not reused meanwhile), so
    /// it must not call back into the engine: a flush that frees slots
    /// holds the engine's lock while it waits for that guard.
    pub fn read_many_each(
        &self,
        name: &str,
        ranges: &[(u64, u64)],
        mut done: impl FnMut(Vec<(usize, Result<ReadOut>)>),
    ) {
        let mut states: Vec<Range> = Vec::with_capacity(ranges.len());
        let mut pieces: Vec<Piece> = Vec::new();
        let reading;
        {
            let mut st = self.lock();
            let map = match Self::vol(&st, name) {
                Ok(rec) => {
                    let (size, map) = (rec.size, rec.map);
                    for &(offset, len) in ranges {
                        let mut r = Range {
                            len: len as usize,
                            waiting: 0,
                            got: Vec::new(),
                            bad_blocks: Vec::new(),
                            failed: Self::check_range(size, offset, len, MAX_IO).err(),
                        };
                        if r.failed.is_some() {
                            r.len = 0;
                        }
                        states.push(r);
                    }
                    map
                }
                Err(e) => {
                    drop(st);
                    done(
                        ranges
                            .iter()
                            .enumerate()
                            .map(|(i, _)| (i, Err(e.clone())))
                            .collect(),
                    );
                    return;
                }
            };
            for (r, &(offset, len)) in ranges.iter().enumerate() {
                if states[r].failed.is_some() {
                    continue;
                }
                let mut pos = 0u64;
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
                                side: None,
                                data: None,
                            }),
                            Err(e) => {
                                states[r].failed = Some(e);
                                break;
                            }
                        }
                    }
                    pos += n;
                }
                if states[r].failed.is_some() {
                    pieces.truncate(first_piece);
                } else {
                    states[r].waiting = pieces.len() - first_piece;
                }
            }
            // Taken before the node lock goes: no slot located above can
            // be given to another extent until these reads are done.
            reading = self.reading.read().expect(crate::POISONED);
        }
        // Ranges with nothing to read (refused, or wholly unmapped) are
        // answered before anything goes to the disk.
        let mut first: Vec<(usize, Result<ReadOut>)> = Vec::new();
        for (i, s) in states.iter_mut().enumerate() {
            if s.waiting == 0 {
                first.push((i, self.range_out(s)));
            }
        }
        if !first.is_empty() {
            done(first);
        }
        // Each piece's sidecar entries (read `2k`) and data (`2k + 1`). The
        // sidecar entry of each block is read in the same submission as its
        // data; which lands first does not matter here, as the range's
        // ticket (the writer's) keeps writes of these blocks out meanwhile.
        let mut reads: Vec<Read> = Vec::with_capacity(pieces.len() * 2);
        for p in &pieces {
            reads.push(Read {
                file: p.file.clone(),
                // A few bytes, read through the page cache: no alignment
                // (and none of its padding) wanted.
                buf: IoBuf::from(vec![0u8; sidecar_len(p.len)]),
                at: sidecar_at(p.base, p.b0),
            });
            // An `IoBuf` is block-aligned in memory; the length decides.
            let data = IoBuf::zeroed(p.len);
            let file = match &p.direct {
                Some(d) if is_block_aligned(&data) => d.clone(),
                _ => p.file.clone(),
            };
            reads.push(Read {
                file,
                buf: data,
                at: p.base + p.b0 * BLOCK_SIZE,
            });
        }
        read_each(reads, |round: Finished| {
            let mut answered = Vec::new();
            for (i, read, outcome) in round {
                let p = &mut pieces[i / 2];
                let got = match outcome {
                    Ok(()) => Ok(read.buf),
                    // A file system may refuse a direct read it accepted
                    // at open; the page cache still serves it.
                    Err(_) if i % 2 == 1 && !Arc::ptr_eq(&read.file, &p.file) => {
                        let mut buf = read.buf;
                        std::os::unix::fs::FileExt::read_exact_at(&*p.file, &mut buf, read.at)
                            .map(|()| buf)
                            .map_err(Error::from)
                    }
                    Err(e) => Err(Error::Io(e.to_string())),
                };
                if i % 2 == 0 {
                    p.side = Some(got);
                } else {
                    p.data = Some(got);
                }
                if let Some(r) = self.piece_landed(p, &mut states) {
                    answered.push((r, self.range_out(&mut states[r])));
                }
            }
            if !answered.is_empty() {
                done(answered);
            }
        });
        drop(reading);
    }

    /// Verifies piece `p` once both its reads are in, and counts it off
    /// its range; the range's index once that was its last piece.
    fn piece_landed(&self, p: &mut Piece, states: &mut [Range]) -> Option<usize> {
        if p.side.is_none() || p.data.is_none() {
            return None;
        }
        let s = &mut states[p.range];
        s.waiting -= 1;
        match (p.side.take(), p.data.take()) {
            (Some(Ok(side)), Some(Ok(mut data))) => {
                let first = p.idx * BLOCKS_PER_EXTENT + p.b0;
                let bad = verify_blocks(&side, &mut data);
                s.bad_blocks.extend(bad.iter().map(|b| first + b));
                s.got.push((p.pos, data));
            }
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                s.failed.get_or_insert(e);
            }
            _ => {}
        }
        (s.waiting == 0).then_some(p.range)
    }

    /// The answer for a range whose pieces are all in (counting its bad
    /// blocks in the node's metrics).
    fn range_out(&self, s: &mut Range) -> Result<ReadOut> {
        let range = Range {
            len: s.len,
            waiting: 0,
            got: std::mem::take(&mut s.got),
            bad_blocks: Vec::new(),
            failed: s.failed.take(),
        };
        let bad_blocks = std::mem::take(&mut s.bad_blocks);
        let data = range.finish()?;
        self.metrics
            .checksum_errors
            .fetch_add(bad_blocks.len() as u64, Ordering::Relaxed);
        Ok(ReadOut { data, bad_blocks })
    }
}
