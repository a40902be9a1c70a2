//! The control queue (`VIRTIO_NET_F_CTRL_VQ`), the third queue after
//! receive and transmit.
//!
//! A command is laid out as (virtio 1.2, 5.1.6.5):
//! `[class: u8, command: u8, data..., device-readable] [ack: u8, device-writable]`.
//! Parsing is pure code over guest memory, bounded and fuzzable; every
//! chain is returned to the guest, answered `VIRTIO_NET_ERR` when it is
//! malformed but has somewhere to put the answer.
//!
//! The device offers no feature that makes Linux send commands beyond
//! `VIRTIO_NET_CTRL_ANNOUNCE_ACK` (`CTRL_RX`, `CTRL_VLAN`, `CTRL_MAC_ADDR`,
//! `MQ`, `CTRL_GUEST_OFFLOADS`... are not offered). Promiscuous and
//! all-multicast requests are still answered OK: the TAP delivers every
//! frame anyway. Everything else gets `VIRTIO_NET_ERR`.

use std::sync::Arc;

use tracing::warn;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::announce::Announcer;
use crate::virtio::interrupt::Interrupt;
use crate::virtio::queue::{add_used, disable_notification, enable_notification, notify_if_needed};
use crate::virtio::worker::GuestErrorLog;

/// `class` and `command`.
pub const CTRL_HDR_LEN: usize = 2;
/// The command data the device reads; longer data (a MAC table, an RSS
/// configuration) belongs to commands it does not serve, which are answered
/// from their header alone.
pub const MAX_CTRL_DATA: usize = 8;

/// The answer written to the ack byte.
pub const ACK_OK: u8 = VIRTIO_NET_OK as u8;
pub const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;

/// Why a control chain is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    #[error("the chain is empty (bad head index or descriptor table)")]
    EmptyChain,
    #[error("the chain is cut short (a loop, a bad next index or a bad indirect table)")]
    Truncated,
    #[error("the chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("no device-writable byte for the ack")]
    NoAck,
    #[error("the command holds {0} readable bytes, less than its 2-byte header")]
    HeaderTooShort(u64),
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
}

/// A command read from the control queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlCommand {
    pub class: u8,
    pub command: u8,
    /// The first [`MAX_CTRL_DATA`] bytes of the command data.
    pub data: Vec<u8>,
    /// The whole command data's length.
    pub data_len: u64,
    /// Where the ack byte goes (checked writable).
    pub ack: GuestAddress,
}

/// A malformed chain, and where (if anywhere) its ack can be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: CtrlError,
    pub ack: Option<GuestAddress>,
}

/// Parses a control command from the descriptors of a chain. At most
/// `max_descs` descriptors are walked; every readable descriptor must lie in
/// guest memory (only the header and the first [`MAX_CTRL_DATA`] data bytes
/// are read) and precede the writable ones, whose first byte takes the ack.
pub fn parse_ctrl<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    max_descs: u16,
) -> Result<CtrlCommand, Rejected> {
    let mut readable = Vec::with_capacity(CTRL_HDR_LEN + MAX_CTRL_DATA);
    let mut readable_len = 0u64;
    let mut ack: Option<GuestAddress> = None;
    let mut seen_writable = false;
    let mut first_error: Option<CtrlError> = None;
    let mut count = 0u16;
    let mut last_has_next = false;
    // The whole chain is walked even after an error, to find the ack byte.
    for d in chain {
        if count >= max_descs {
            first_error.get_or_insert(CtrlError::TooManyDescriptors(max_descs));
            break;
        }
        count += 1;
        last_has_next = d.has_next();
        if d.is_write_only() {
            if !seen_writable {
                seen_writable = true;
                if d.len() >= 1 && mem.check_range(d.addr(), 1, Permissions::Write) {
                    ack = Some(d.addr());
                }
            }
            continue;
        }
        if seen_writable {
            first_error.get_or_insert(CtrlError::ReadableAfterWritable);
            continue;
        }
        let outside = CtrlError::OutsideGuestMemory {
            addr: d.addr().0,
            len: d.len(),
        };
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Read) {
            first_error.get_or_insert(outside);
            continue;
        }
        let want = (CTRL_HDR_LEN + MAX_CTRL_DATA - readable.len()).min(d.len() as usize);
        if want > 0 {
            let start = readable.len();
            readable.resize(start + want, 0);
            if mem.read_slice(&mut readable[start..], d.addr()).is_err() {
                readable.truncate(start);
                first_error.get_or_insert(outside);
                continue;
            }
        }
        readable_len += u64::from(d.len());
    }
    if count == 0 {
        first_error.get_or_insert(CtrlError::EmptyChain);
    }
    if last_has_next {
        first_error.get_or_insert(CtrlError::Truncated);
    }
    if ack.is_none() {
        first_error.get_or_insert(CtrlError::NoAck);
    }
    if readable_len < CTRL_HDR_LEN as u64 {
        first_error.get_or_insert(CtrlError::HeaderTooShort(readable_len));
    }
    match (first_error, ack) {
        (None, Some(ack)) => Ok(CtrlCommand {
            class: readable[0],
            command: readable[1],
            data: readable[CTRL_HDR_LEN..].to_vec(),
            data_len: readable_len - CTRL_HDR_LEN as u64,
            ack,
        }),
        (error, ack) => Err(Rejected {
            error: error.unwrap_or(CtrlError::NoAck),
            ack,
        }),
    }
}

/// Executes a command; returns the ack.
pub fn execute(cmd: &CtrlCommand, announcer: &Announcer) -> u8 {
    let (class, command) = (u32::from(cmd.class), u32::from(cmd.command));
    match (class, command) {
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
            announcer.ack();
            ACK_OK
        }
        // The TAP delivers every frame: the device is always promiscuous,
        // and turning that off is a filter it may skip. The data is one
        // on/off byte.
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI)
            if cmd.data_len == 1 =>
        {
            ACK_OK
        }
        _ => ACK_ERR,
    }
}

/// The control queue of one activation, served on the device's worker.
pub(super) struct CtrlQueue {
    queue: Queue,
    evt: Arc<EventFd>,
    announcer: Arc<Announcer>,
    bad: GuestErrorLog,
    unsupported: GuestErrorLog,
    /// Malformed chains seen.
    pub(super) malformed: u64,
    /// Well-formed commands answered `VIRTIO_NET_ERR`.
    pub(super) refused: u64,
}

impl CtrlQueue {
    pub(super) fn new(queue: Queue, evt: Arc<EventFd>, announcer: Arc<Announcer>) -> Self {
        Self {
            queue,
            evt,
            announcer,
            bad: GuestErrorLog::default(),
            unsupported: GuestErrorLog::default(),
            malformed: 0,
            refused: 0,
        }
    }

    /// The queue, handed back when the device is quiesced.
    pub(super) fn into_queue(self) -> Queue {
        self.queue
    }

    /// The queue's notification eventfd.
    pub(super) fn evt(&self) -> &Arc<EventFd> {
        &self.evt
    }

    /// Answers every command the driver queued.
    pub(super) fn process(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        let mut total = 0usize;
        loop {
            if let Err(e) = disable_notification(&mut self.queue, mem) {
                warn!("virtio-net: cannot disable control queue notifications: {e}");
            }
            let mut handled = 0usize;
            let max = self.queue.size();
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let used = self.answer(mem, parse_ctrl(mem, chain, max));
                add_used(&mut self.queue, mem, head, used);
                handled += 1;
            }
            total += handled;
            match enable_notification(&mut self.queue, mem) {
                Ok(true) if handled > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!("virtio-net: cannot enable control queue notifications: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            notify_if_needed(&mut self.queue, mem, interrupt);
        }
    }

    /// Executes a parsed command (or refuses a malformed one), writes the
    /// ack and returns the used length.
    fn answer(&mut self, mem: &GuestMemoryMmap, parsed: Result<CtrlCommand, Rejected>) -> u32 {
        let (ack, at) = match parsed {
            Ok(cmd) => {
                let ack = execute(&cmd, &self.announcer);
                if ack != ACK_OK {
                    self.refused += 1;
                    if let Some(n) = self.unsupported.hit() {
                        warn!(
                            occurrences = n,
                            "virtio-net: refusing control command class {} command {}",
                            cmd.class,
                            cmd.command
                        );
                    }
                }
                (ack, cmd.ack)
            }
            Err(Rejected { error, ack }) => {
                self.malformed += 1;
                if let Some(n) = self.bad.hit() {
                    warn!(
                        occurrences = n,
                        "virtio-net: malformed control command: {error}"
                    );
                }
                match ack {
                    Some(at) => (ACK_ERR, at),
                    None => return 0,
                }
            }
        };
        match mem.write_obj(ack, at) {
            Ok(()) => {
                crate::dirty::mark(at, 1);
                1
            }
            Err(e) => {
                warn!("virtio-net: cannot write a control command's ack: {e}");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_CTRL_MAC;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const USED: u64 = 0x8000;
    const HDR: u64 = 0x1_0000;
    const ACK: u64 = 0x2_0000;
    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    struct Rig<'a> {
        q: MockSplitQueue<'a, GuestMemoryMmap>,
        ctrl: CtrlQueue,
        announcer: Arc<Announcer>,
        interrupt: Interrupt,
        irq: EventFd,
    }

    fn rig(m: &GuestMemoryMmap) -> Rig<'_> {
        rig_at(m, 0)
    }

    /// The rig with its ring at `base` (the used ring at `base + USED`).
    fn rig_at(m: &GuestMemoryMmap, base: u64) -> Rig<'_> {
        let q = MockSplitQueue::create(m, GuestAddress(base), 16);
        let mut queue: Queue = q.create_queue().unwrap();
        // The mock's used ring overlaps the avail ring's used_event field.
        let used = base + USED;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        let announcer = Arc::new(Announcer::default());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        Rig {
            q,
            ctrl: CtrlQueue::new(
                queue,
                Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                announcer.clone(),
            ),
            announcer,
            interrupt: Interrupt::new(irq.try_clone().unwrap()),
            irq,
        }
    }

    /// The used ring: (head, length) pairs.
    fn used(m: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % 16);
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn ack(m: &GuestMemoryMmap, at: u64) -> u8 {
        m.read_obj(GuestAddress(at)).unwrap()
    }

    /// Queues `descs` as one chain from descriptor `first` on.
    fn queue_chain(q: &MockSplitQueue<GuestMemoryMmap>, descs: &[RawDescriptor], first: u16) {
        let last = descs.len() - 1;
        let linked: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let d = Descriptor::from(*raw);
                let (flags, next) = if i == last {
                    (d.flags() & !N, 0)
                } else {
                    (d.flags() | N, first + i as u16 + 1)
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        q.add_desc_chains(&linked, first).unwrap();
    }

    /// Queues `[class, command, data...] [ack]` as two descriptors, the way
    /// Linux does, starting at descriptor `first`.
    fn command(r: &Rig, m: &GuestMemoryMmap, first: u16, class: u32, cmd: u32, data: &[u8]) {
        let mut out = vec![class as u8, cmd as u8];
        out.extend_from_slice(data);
        m.write_slice(&out, GuestAddress(HDR)).unwrap();
        m.write_obj(0xffu8, GuestAddress(ACK)).unwrap();
        queue_chain(&r.q, &[d(HDR, out.len() as u32, 0), d(ACK, 1, W)], first);
    }

    #[test]
    fn announce_ack_clears_the_bit_and_answers_ok() {
        let m = mem();
        let mut r = rig(&m);
        let int = Arc::new(Interrupt::new(r.irq.try_clone().unwrap()));
        r.announcer.activated(Some(int));
        assert!(r.announcer.announce().unwrap());
        assert!(r.announcer.pending());
        command(
            &r,
            &m,
            0,
            VIRTIO_NET_CTRL_ANNOUNCE,
            VIRTIO_NET_CTRL_ANNOUNCE_ACK,
            &[],
        );
        r.ctrl.process(&m, &r.interrupt);
        assert!(!r.announcer.pending());
        assert_eq!(ack(&m, ACK), ACK_OK);
        assert_eq!(used(&m), vec![(0, 1)]);
        assert_eq!((r.ctrl.malformed, r.ctrl.refused), (0, 0));
        // Used buffers were signalled (on the rig's own interrupt).
        assert_ne!(r.interrupt.status(), 0);
    }

    /// The ack and the used ring are marked for live migration
    /// ([`crate::dirty`]), not the command the device only reads. The
    /// tracker's RAM is far above what other tests use.
    #[test]
    fn answers_mark_the_ack_and_the_used_ring() {
        use crate::dirty::{self, PAGE_SIZE};
        const BASE: u64 = 0x7400_0000_0000;
        let _g = dirty::test_lock();
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), MEM as usize)]).unwrap();
        let mut r = rig_at(&m, BASE);
        m.write_slice(&[0x7f, 0], GuestAddress(BASE + HDR)).unwrap();
        queue_chain(&r.q, &[d(BASE + HDR, 2, 0), d(BASE + ACK, 1, W)], 0);
        dirty::start(&[(GuestAddress(BASE), MEM)]);
        r.ctrl.process(&m, &r.interrupt);
        let words = dirty::take();
        dirty::stop();
        assert_eq!(ack(&m, BASE + ACK), ACK_ERR);
        let marked: Vec<u64> = (0..words.len() as u64 * 64)
            .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(marked, vec![USED / PAGE_SIZE, ACK / PAGE_SIZE]);
    }

    #[test]
    fn unsupported_commands_get_err_and_rx_modes_ok() {
        let m = mem();
        let mut r = rig(&m);
        // An unknown class.
        command(&r, &m, 0, 0x7f, 0, &[1, 2, 3]);
        r.ctrl.process(&m, &r.interrupt);
        assert_eq!(ack(&m, ACK), ACK_ERR);
        // A known class the device does not serve (a MAC table).
        command(&r, &m, 2, VIRTIO_NET_CTRL_MAC, 0, &[0; 8]);
        r.ctrl.process(&m, &r.interrupt);
        assert_eq!(ack(&m, ACK), ACK_ERR);
        // Promiscuous mode on: OK.
        command(
            &r,
            &m,
            4,
            VIRTIO_NET_CTRL_RX,
            VIRTIO_NET_CTRL_RX_PROMISC,
            &[1],
        );
        r.ctrl.process(&m, &r.interrupt);
        assert_eq!(ack(&m, ACK), ACK_OK);
        // ... but not without its on/off byte.
        command(
            &r,
            &m,
            6,
            VIRTIO_NET_CTRL_RX,
            VIRTIO_NET_CTRL_RX_ALLMULTI,
            &[],
        );
        r.ctrl.process(&m, &r.interrupt);
        assert_eq!(ack(&m, ACK), ACK_ERR);
        assert_eq!(used(&m), vec![(0, 1), (2, 1), (4, 1), (6, 1)]);
        assert_eq!((r.ctrl.malformed, r.ctrl.refused), (0, 3));
    }

    #[test]
    fn malformed_chains_are_answered_or_returned_without_panic() {
        let m = mem();
        let mut r = rig(&m);
        m.write_slice(&[3, 0], GuestAddress(HDR)).unwrap();
        let ack_at = |i: u64| ACK + 0x100 * i;
        for i in 0..8 {
            m.write_obj(0xffu8, GuestAddress(ack_at(i))).unwrap();
        }
        let chains: Vec<Vec<RawDescriptor>> = vec![
            // 0: a one-byte header, then the ack.
            vec![d(HDR, 1, 0), d(ack_at(0), 1, W)],
            // 1: no writable descriptor at all.
            vec![d(HDR, 2, 0)],
            // 2: the "status" descriptor is device-readable.
            vec![d(HDR, 2, 0), d(ack_at(2), 1, 0)],
            // 3: a huge readable descriptor running out of guest memory.
            vec![d(HDR, 0x8000_0000, 0), d(ack_at(3), 1, W)],
            // 4: the header is writable, then a readable one follows.
            vec![d(ack_at(4), 1, W), d(HDR, 2, 0)],
            // 5: an empty writable descriptor.
            vec![d(HDR, 2, 0), d(ack_at(5), 0, W)],
            // 6: the ack outside guest memory.
            vec![d(HDR, 2, 0), d(MEM - 1 + 0x10, 1, W)],
            // 7: a good one afterwards still works.
            vec![d(HDR, 2, 0), d(ack_at(7), 1, W)],
        ];
        let mut first = 0u16;
        let mut heads = Vec::new();
        for c in &chains {
            queue_chain(&r.q, c, first);
            heads.push(u32::from(first));
            first += c.len() as u16;
        }
        r.ctrl.process(&m, &r.interrupt);
        let got = used(&m);
        assert_eq!(
            got.iter().map(|u| u.0).collect::<Vec<_>>(),
            heads,
            "every chain is returned"
        );
        let lens: Vec<u32> = got.iter().map(|u| u.1).collect();
        assert_eq!(lens, vec![1, 0, 0, 1, 1, 0, 0, 1]);
        assert_eq!(ack(&m, ack_at(0)), ACK_ERR);
        assert_eq!(
            ack(&m, ack_at(2)),
            0xff,
            "a readable descriptor is never written"
        );
        assert_eq!(ack(&m, ack_at(3)), ACK_ERR);
        assert_eq!(ack(&m, ack_at(4)), ACK_ERR);
        assert_eq!(ack(&m, ack_at(5)), 0xff);
        assert_eq!(ack(&m, ack_at(7)), ACK_OK);
        assert_eq!(r.ctrl.malformed, 7);
    }

    fn parse(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<CtrlCommand, Rejected> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse_ctrl(m, chain, 16)
    }

    #[test]
    fn parses_split_and_merged_layouts() {
        let m = mem();
        m.write_slice(&[0, 1, 1, 0xaa], GuestAddress(HDR)).unwrap();
        // Header and data in one descriptor, the ack in the last one of two
        // writable descriptors.
        let c = parse(&m, &[d(HDR, 3, 0), d(ACK, 1, W), d(ACK + 8, 4, W)]).unwrap();
        assert_eq!((c.class, c.command, c.data_len), (0, 1, 1));
        assert_eq!((c.data.as_slice(), c.ack), (&[1u8][..], GuestAddress(ACK)));
        // Header split over two descriptors.
        let c = parse(&m, &[d(HDR, 1, 0), d(HDR + 1, 1, 0), d(ACK, 1, W)]).unwrap();
        assert_eq!((c.class, c.command, c.data_len), (0, 1, 0));
        // Long data is bounded: only MAX_CTRL_DATA bytes are kept.
        let c = parse(&m, &[d(HDR, 0x4000, 0), d(ACK, 1, W)]).unwrap();
        assert_eq!(c.data.len(), MAX_CTRL_DATA);
        assert_eq!(c.data_len, 0x4000 - 2);
    }

    #[test]
    fn refuses_overlong_and_truncated_chains() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let descs: Vec<_> = (0..5).map(|i| d(HDR + i, 1, 0)).collect();
        let chain = q.build_desc_chain(&descs).unwrap();
        assert_eq!(
            parse_ctrl(&m, chain, 4).unwrap_err().error,
            CtrlError::TooManyDescriptors(4)
        );
        // More than 4 GiB in one chain: virtio-queue stops the walk before
        // the ack, which is then never written.
        let r = parse(&m, &[d(HDR, u32::MAX, 0), d(ACK, 1, W)]).unwrap_err();
        assert!(matches!(r.error, CtrlError::OutsideGuestMemory { .. }));
        assert_eq!(r.ack, None);
        // A loop: the walk stops on a descriptor that still has NEXT.
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(HDR, 2, N, 1)),
                RawDescriptor::from(Descriptor::new(ACK, 1, N | W, 2)),
                RawDescriptor::from(Descriptor::new(ACK + 8, 1, N | W, 1)),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let r = parse_ctrl(&m, chain, 16).unwrap_err();
        assert_eq!(r.error, CtrlError::Truncated);
        assert_eq!(r.ack, Some(GuestAddress(ACK)));
    }
}
