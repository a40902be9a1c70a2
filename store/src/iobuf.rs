//! Data buffers whose first byte sits on a block boundary in memory.
//!
//! A write of 128 KiB or more goes to the slab with `O_DIRECT`, which
//! wants its buffer's address to be a multiple of the block size; a
//! `Vec<u8>` from the allocator is only 16-byte aligned, so such a write
//! would first be copied into an aligned buffer. An [`IoBuf`] is a `Vec`
//! with room to spare in front, its data starting at the first aligned
//! address in it: filled once where the data enters kiln-store (from the
//! guest's memory, from the network), it reaches the disk without another
//! copy. The serialized form is plain bytes, the same as a `Vec<u8>` with
//! `serde_bytes`, so the wire protocol does not change.

use std::fmt;
use std::ops::{Deref, DerefMut};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The alignment an [`IoBuf`] aims for: the store's block size, which is
/// also the logical block size `O_DIRECT` asks of buffers.
pub const ALIGN: usize = crate::BLOCK_SIZE as usize;

/// A byte buffer, block-aligned in memory where the allocator allows (see
/// the module). Reads and writes see only its data.
#[derive(Default)]
pub struct IoBuf {
    vec: Vec<u8>,
    start: usize,
}

impl IoBuf {
    /// `len` zero bytes, block-aligned.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut vec = Vec::with_capacity(len + ALIGN - 1);
        let start = aligned_start(&vec);
        vec.resize(start + len, 0);
        IoBuf { vec, start }
    }

    /// A block-aligned copy of `data` (only the padding in front is
    /// zeroed, not the whole buffer first).
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut vec = Vec::with_capacity(data.len() + ALIGN - 1);
        let start = aligned_start(&vec);
        vec.resize(start, 0);
        vec.extend_from_slice(data);
        IoBuf { vec, start }
    }

    /// A block-aligned buffer for `len` bytes that `fill` appends to the
    /// `Vec` it is given (its padding in front already there), with no
    /// zeroing first: for data copied in from elsewhere in pieces, such as
    /// a guest's memory. The buffer holds what `fill` appended; appending
    /// more than `len` bytes may leave it unaligned (still correct: an
    /// `O_DIRECT` write then copies it). An error of `fill` is returned.
    pub fn fill_with<E>(
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<IoBuf, E> {
        let mut vec = Vec::with_capacity(len + ALIGN - 1);
        let start = aligned_start(&vec);
        vec.resize(start, 0);
        fill(&mut vec)?;
        Ok(IoBuf { vec, start })
    }

    /// Whether the data starts on a block boundary in memory.
    pub fn is_aligned(&self) -> bool {
        self.vec[self.start..].as_ptr().align_offset(ALIGN) == 0
    }

    /// Shortens the data to `len` bytes (no-op if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.vec.truncate(self.start + len);
    }

    /// The data as a `Vec` (without a copy if it starts at the front).
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.start != 0 {
            self.vec.drain(..self.start);
        }
        self.vec
    }
}

/// Where the first block-aligned address of the (empty) `vec`'s
/// allocation is, for a buffer made with `ALIGN - 1` bytes to spare; 0 if
/// `align_offset` gives up (then the buffer is simply unaligned, and an
/// `O_DIRECT` write copies it).
fn aligned_start(vec: &[u8]) -> usize {
    let at = vec.as_ptr().align_offset(ALIGN);
    if at < ALIGN {
        at
    } else {
        0
    }
}

impl Clone for IoBuf {
    /// An aligned copy: the copied `Vec` is a new allocation, where the
    /// original's padding would put the data anywhere.
    fn clone(&self) -> IoBuf {
        IoBuf::copy_from(self)
    }
}

impl From<Vec<u8>> for IoBuf {
    /// Takes the `Vec` as it is (aligned only by chance).
    fn from(vec: Vec<u8>) -> IoBuf {
        IoBuf { vec, start: 0 }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..]
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len())
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &IoBuf) -> bool {
        **self == **other
    }
}

impl Eq for IoBuf {}

impl PartialEq<[u8]> for IoBuf {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<&[u8]> for IoBuf {
    fn eq(&self, other: &&[u8]) -> bool {
        **self == **other
    }
}

impl PartialEq<Vec<u8>> for IoBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == **other
    }
}

impl Serialize for IoBuf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self)
    }
}

impl<'de> Deserialize<'de> for IoBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IoBuf, D::Error> {
        d.deserialize_bytes(BytesVisitor)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = IoBuf;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<IoBuf, E> {
        Ok(IoBuf::copy_from(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<IoBuf, E> {
        Ok(IoBuf::copy_from(&v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IoBuf, A::Error> {
        // Formats without a bytes type; the length hint is not trusted.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 << 10));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(IoBuf::copy_from(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_hold_their_data() {
        for len in [0usize, 1, 511, 4096, 128 << 10, (1 << 20) + 7] {
            let z = IoBuf::zeroed(len);
            assert_eq!(z.len(), len);
            assert!(z.is_aligned(), "zeroed({len})");
            assert!(z.iter().all(|&b| b == 0));
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let c = IoBuf::copy_from(&data);
            assert!(c.is_aligned(), "copy_from({len})");
            assert_eq!(c, data);
            assert_eq!(c.clone().into_vec(), data);
            // Clones are aligned too, whatever padding the original has:
            // many of them, so that one at a chance alignment cannot pass.
            let clones: Vec<IoBuf> = (0..16).map(|_| c.clone()).collect();
            for k in &clones {
                assert!(k.is_aligned(), "clone of copy_from({len})");
                assert_eq!(*k, data);
            }
        }
    }

    #[test]
    fn filled_buffers_are_aligned_and_hold_what_was_appended() {
        for len in [0usize, 1, 4096, 128 << 10, (1 << 20) + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i * 5 + 1) as u8).collect();
            // In three pieces, as a guest's segments come.
            let b = IoBuf::fill_with(len, |v| {
                for piece in data.chunks(len / 3 + 1) {
                    v.extend_from_slice(piece);
                }
                Ok::<(), ()>(())
            })
            .unwrap();
            assert!(b.is_aligned(), "fill_with({len})");
            assert_eq!(b, data);
        }
        assert_eq!(
            IoBuf::fill_with(8, |v| {
                v.push(1);
                Err("guest memory")
            }),
            Err("guest memory")
        );
    }

    #[test]
    fn truncate_and_write_through_the_data_only() {
        let mut b = IoBuf::copy_from(&[1, 2, 3, 4]);
        b[0] = 9;
        b.truncate(2);
        assert_eq!(&*b, &[9, 2]);
        b.truncate(10);
        assert_eq!(b.into_vec(), vec![9, 2]);
    }

    #[test]
    fn the_wire_form_is_that_of_serde_bytes() {
        #[derive(Serialize, Deserialize)]
        struct Old {
            #[serde(with = "serde_bytes")]
            data: Vec<u8>,
        }
        #[derive(Serialize, Deserialize)]
        struct New {
            data: IoBuf,
        }
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let old = postcard::to_stdvec(&Old { data: data.clone() }).unwrap();
        let new = postcard::to_stdvec(&New {
            data: IoBuf::copy_from(&data),
        })
        .unwrap();
        assert_eq!(old, new);
        let back: New = postcard::from_bytes(&old).unwrap();
        assert_eq!(back.data, data);
        assert!(back.data.is_aligned());
        // A length prefix larger than what follows is an error, not an
        // allocation of that size.
        let mut lie = Vec::new();
        lie.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        lie.extend_from_slice(&[1, 2, 3]);
        assert!(postcard::from_bytes::<New>(&lie).is_err());
    }
}
