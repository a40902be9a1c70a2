//! Gathering a guest's transmit chain into one frame: pure code over guest
//! memory, bounded and fuzzable.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory};

use super::tap::VNET_HDR_LEN;
use super::MAX_BUFFER_LEN;

/// Why a transmit chain was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("the chain is cut short (a loop, a bad next index or a bad indirect table)")]
    Truncated,
    #[error("the chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    #[error("the chain holds a device-writable descriptor")]
    WriteOnlyDescriptor,
    #[error("the chain holds more than {MAX_BUFFER_LEN} bytes")]
    TooLong,
    #[error("the chain holds {0} bytes, less than a virtio-net header")]
    TooShort(usize),
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
}

/// Copies the frame (virtio-net header included) described by `chain` into
/// `buf`, returning its length. At most `max_descs` descriptors and
/// [`MAX_BUFFER_LEN`] bytes are accepted.
pub fn read_tx_frame<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    max_descs: u16,
    buf: &mut Vec<u8>,
) -> Result<usize, TxError> {
    buf.clear();
    let mut count = 0u16;
    let mut last_has_next = false;
    for d in chain {
        count = count
            .checked_add(1)
            .filter(|&c| c <= max_descs)
            .ok_or(TxError::TooManyDescriptors(max_descs))?;
        if d.is_write_only() {
            return Err(TxError::WriteOnlyDescriptor);
        }
        let len = d.len() as usize;
        let start = buf.len();
        if len > MAX_BUFFER_LEN - start {
            return Err(TxError::TooLong);
        }
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], d.addr())
            .map_err(|_| TxError::OutsideGuestMemory {
                addr: d.addr().0,
                len: d.len(),
            })?;
        last_has_next = d.has_next();
    }
    if last_has_next {
        return Err(TxError::Truncated);
    }
    if buf.len() < VNET_HDR_LEN {
        return Err(TxError::TooShort(buf.len()));
    }
    Ok(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn gather(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Vec<u8>, TxError> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut buf = Vec::new();
        read_tx_frame(m, chain, 16, &mut buf).map(|n| buf[..n].to_vec())
    }

    #[test]
    fn gathers_in_order() {
        let m = mem();
        m.write_slice(&[1u8; 12], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[2u8; 60], GuestAddress(0x3000)).unwrap();
        let frame = gather(&m, &[d(0x1000, 12, 0), d(0x3000, 60, 0)]).unwrap();
        assert_eq!(frame.len(), 72);
        assert!(frame[..12].iter().all(|&b| b == 1));
        assert!(frame[12..].iter().all(|&b| b == 2));
    }

    #[test]
    fn refuses_hostile_chains() {
        let m = mem();
        let w = VRING_DESC_F_WRITE as u16;
        assert_eq!(
            gather(&m, &[d(0x1000, 12, 0), d(0x2000, 100, w)]),
            Err(TxError::WriteOnlyDescriptor)
        );
        assert_eq!(gather(&m, &[d(0x1000, 0, 0)]), Err(TxError::TooShort(0)));
        assert_eq!(gather(&m, &[d(0x1000, 11, 0)]), Err(TxError::TooShort(11)));
        assert_eq!(
            gather(&m, &[d(0x1000, 12, 0), d(0x2000, 70_000, 0)]).map(|f| f.len()),
            Err(TxError::TooLong)
        );
        assert_eq!(gather(&m, &[d(0x1000, u32::MAX, 0)]), Err(TxError::TooLong));
        assert!(matches!(
            gather(&m, &[d(0x1000, 12, 0), d(0xf_fff0, 0x100, 0)]),
            Err(TxError::OutsideGuestMemory { .. })
        ));
        assert!(matches!(
            gather(&m, &[d(u64::MAX - 4, 12, 0)]),
            Err(TxError::OutsideGuestMemory { .. })
        ));
        // Exactly at the limit is fine.
        let max = MAX_BUFFER_LEN as u32;
        assert_eq!(
            gather(&m, &[d(0x1000, 12, 0), d(0x2000, max - 12, 0)])
                .unwrap()
                .len(),
            MAX_BUFFER_LEN
        );
    }

    #[test]
    fn refuses_too_many_descriptors() {
        let m = mem();
        let descs: Vec<_> = (0..5).map(|i| d(0x1000 + i * 16, 16, 0)).collect();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&descs).unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_tx_frame(&m, chain, 4, &mut buf),
            Err(TxError::TooManyDescriptors(4))
        );
    }

    #[test]
    fn refuses_loops() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(0x1000, 12, n, 1)),
            RawDescriptor::from(Descriptor::new(0x2000, 12, n, 0)),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_tx_frame(&m, chain, 16, &mut buf),
            Err(TxError::Truncated)
        );
    }
}
