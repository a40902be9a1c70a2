//! Scattering a received frame into a guest's receive chain: pure code over
//! guest memory, bounded and fuzzable.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a receive chain could not take a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    #[error("the chain is cut short (a loop, a bad next index or a bad indirect table)")]
    Truncated,
    #[error("the chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    #[error("the chain holds a device-readable descriptor")]
    ReadOnlyDescriptor,
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("the chain holds {have} bytes, the frame needs {need}")]
    TooSmall { have: u64, need: usize },
}

/// Writes `frame` (virtio-net header included) into the buffers of `chain`,
/// returning the used length. Nothing is written unless the whole chain is
/// valid and large enough.
pub fn write_rx_frame<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    max_descs: u16,
    frame: &[u8],
) -> Result<u32, RxError> {
    let mut buffers: Vec<(GuestAddress, u32)> = Vec::new();
    let mut have = 0u64;
    let mut last_has_next = false;
    for d in chain {
        if buffers.len() >= usize::from(max_descs) {
            return Err(RxError::TooManyDescriptors(max_descs));
        }
        if !d.is_write_only() {
            return Err(RxError::ReadOnlyDescriptor);
        }
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Write) {
            return Err(RxError::OutsideGuestMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        have += u64::from(d.len());
        buffers.push((d.addr(), d.len()));
        last_has_next = d.has_next();
    }
    if last_has_next {
        return Err(RxError::Truncated);
    }
    if have < frame.len() as u64 {
        return Err(RxError::TooSmall {
            have,
            need: frame.len(),
        });
    }
    let mut rest = frame;
    for (addr, len) in buffers {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        mem.write_slice(&rest[..n], addr)
            .map_err(|_| RxError::OutsideGuestMemory { addr: addr.0, len })?;
        crate::dirty::mark(addr, n as u64);
        rest = &rest[n..];
    }
    // A frame is at most MAX_BUFFER_LEN bytes.
    Ok(u32::try_from(frame.len()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn scatter(m: &GuestMemoryMmap, descs: &[RawDescriptor], frame: &[u8]) -> Result<u32, RxError> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        write_rx_frame(m, chain, 16, frame)
    }

    #[test]
    fn scatters_across_buffers() {
        let m = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        let n = scatter(&m, &[d(0x1000, 40, W), d(0x3000, 100, W)], &frame).unwrap();
        assert_eq!(n, 100);
        let mut a = [0u8; 40];
        m.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        assert_eq!(&a[..], &frame[..40]);
        let mut b = [0u8; 60];
        m.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(&b[..], &frame[40..]);
    }

    #[test]
    fn refuses_hostile_chains_without_writing() {
        let m = mem();
        let frame = [7u8; 100];
        assert_eq!(
            scatter(&m, &[d(0x1000, 50, W), d(0x2000, 50, 0)], &frame),
            Err(RxError::ReadOnlyDescriptor)
        );
        assert_eq!(
            scatter(&m, &[d(0x1000, 50, W), d(0x2000, 49, W)], &frame),
            Err(RxError::TooSmall {
                have: 99,
                need: 100
            })
        );
        assert_eq!(
            scatter(&m, &[d(0x1000, 0, W)], &frame),
            Err(RxError::TooSmall { have: 0, need: 100 })
        );
        assert!(matches!(
            scatter(&m, &[d(0x1000, 50, W), d(0xf_fff0, 100, W)], &frame),
            Err(RxError::OutsideGuestMemory { .. })
        ));
        assert!(matches!(
            scatter(&m, &[d(u64::MAX - 10, 200, W)], &frame),
            Err(RxError::OutsideGuestMemory { .. })
        ));
        // Nothing was written by the refused chains.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
    }

    #[test]
    fn refuses_loops_and_long_chains() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(0x1000, 12, n | W, 1)),
            RawDescriptor::from(Descriptor::new(0x2000, 12, n | W, 0)),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        assert_eq!(
            write_rx_frame(&m, chain, 16, &[1; 20]),
            Err(RxError::Truncated)
        );

        let q = MockSplitQueue::new(&m, 16);
        let descs: Vec<_> = (0..5).map(|i| d(0x1000 + i * 64, 64, W)).collect();
        let chain = q.build_desc_chain(&descs).unwrap();
        assert_eq!(
            write_rx_frame(&m, chain, 4, &[1; 20]),
            Err(RxError::TooManyDescriptors(4))
        );
    }
}
