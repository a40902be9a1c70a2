//! Migration messages and their byte layout (all integers little-endian).
//!
//! ```text
//! source                                  destination
//!   Hello{version, vmm, ram, vcpus, devs} ->
//!                                         <- Accept | Refuse{reason}
//!   Pages / ZeroPages ...   (round 0: all RAM)
//!   Round{1}, Pages / ZeroPages ...  (pages dirtied meanwhile)
//!   ...
//!   Round{n}, Pages / ZeroPages ...  (the VM is paused: the rest)
//!   [Handover{items} + descriptors]       (unix socket only)
//!   State{bytes}... Complete              ->
//!                                         <- Restored | Abort{reason}
//!   Commit                                ->
//!                                         <- Resumed | Abort{reason}
//! ```
//! Either side may send `Abort{reason}` at any time and close.
//!
//! The commit step keeps the VM from ever running twice. The destination
//! restores the machine without running it and says `Restored`; until the
//! source sends `Commit`, any failure leaves the VM running on the source
//! only (the destination discards what it restored). Once the source has
//! sent `Commit` it never resumes on its own: the destination runs the VM
//! and says `Resumed`, or says `Abort` (it did not run it: the source may
//! resume). A link lost between `Commit` and `Resumed` leaves the VM
//! paused on the source and running on the destination or nowhere; that
//! needs a look from outside (see [`super::MigrationError::in_doubt`]).
//!
//! Over a unix socket (both processes on one host: a kiln-vmm upgrade) the
//! source may hand over instead of copy: `Handover` lists descriptors sent
//! with it (`SCM_RIGHTS`): guest RAM's memfd, which the destination maps
//! as its own RAM (then no pages are sent at all), and the connections to
//! vhost-user backends, which serve one frontend at a time and so cannot
//! be connected to anew while the source holds them. The destination
//! uses neither before `Commit`: until then the source may resume.
//!
//! A page is 4 KiB; page numbers count RAM pages, not guest addresses:
//! page `i` is byte `i * 4096` of guest RAM taken as its ranges laid end
//! to end in guest-address order (as in the snapshot memory file).

use super::transport::{Connection, TransportError, MAX_FRAME_LEN};

/// The message layout this kiln-vmm speaks; a destination refuses another.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
/// The longest string field (reasons, names).
const MAX_STRING: usize = 4096;
/// The most devices a Hello may list.
const MAX_DEVICES: usize = 1024;

pub mod ty {
    pub const HELLO: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const PAGES: u8 = 4;
    pub const ZERO_PAGES: u8 = 5;
    pub const ROUND: u8 = 6;
    pub const STATE: u8 = 7;
    pub const COMPLETE: u8 = 8;
    pub const RESTORED: u8 = 9;
    pub const COMMIT: u8 = 10;
    pub const RESUMED: u8 = 11;
    pub const ABORT: u8 = 12;
    pub const HANDOVER: u8 = 13;
}

fn known_type(t: u8) -> bool {
    (ty::HELLO..=ty::HANDOVER).contains(&t)
}

/// The most items one Handover may list (each comes with a descriptor).
pub const MAX_HANDOVER_ITEMS: usize = 16;
/// The most RAM ranges a handed-over memory may have.
const MAX_RAM_RANGES: usize = 8;

/// What a handed-over descriptor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handed {
    /// Guest RAM: a memfd holding all of it, the ranges end to end, and
    /// where the source maps each range (the destination maps them at
    /// the same addresses: a vhost-user backend knows the rings by them).
    Memory { host_addrs: Vec<u64> },
    /// The connection to the vhost-user backend of disk `id`, listening
    /// at `socket`.
    VhostUser { id: String, socket: String },
}

/// One device, as the other side must have it too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId {
    /// e.g. "virtio-blk", "virtio-net".
    pub kind: String,
    /// The user's `id=`.
    pub id: String,
}

/// What must match on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub ram_size: u64,
    pub vcpus: u32,
    pub devices: Vec<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub format_version: u32,
    /// The source's kiln-vmm version (informational).
    pub vmm_version: String,
    pub machine: Machine,
}

/// A run of consecutive pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first_page: u64,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Accept,
    Refuse {
        reason: String,
    },
    /// Runs of pages, then their bytes in the same order
    /// (`sum(count) * PAGE_SIZE` bytes).
    Pages {
        runs: Vec<Run>,
        data: Vec<u8>,
    },
    /// Runs of pages that read as zero.
    ZeroPages {
        runs: Vec<Run>,
    },
    Round {
        n: u32,
    },
    /// A piece of the machine state; pieces are concatenated until
    /// `Complete`.
    State(Vec<u8>),
    Complete,
    /// Destination: the machine is restored, not running.
    Restored,
    /// Source: run it; I will not resume.
    Commit,
    /// Destination: it runs here.
    Resumed,
    Abort {
        reason: String,
    },
    /// Descriptors sent with this message, one per item, in order.
    Handover(Vec<Handed>),
}

impl Message {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Accept => "Accept",
            Message::Refuse { .. } => "Refuse",
            Message::Pages { .. } => "Pages",
            Message::ZeroPages { .. } => "ZeroPages",
            Message::Round { .. } => "Round",
            Message::State(_) => "State",
            Message::Complete => "Complete",
            Message::Restored => "Restored",
            Message::Commit => "Commit",
            Message::Resumed => "Resumed",
            Message::Abort { .. } => "Abort",
            Message::Handover(_) => "Handover",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("malformed {message} message: {reason}")]
    Malformed {
        message: &'static str,
        reason: String,
    },
}

fn malformed(message: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        message,
        reason: reason.into(),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(malformed(self.message, "truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u16()? as usize;
        if n > MAX_STRING {
            return Err(malformed(self.message, "string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| malformed(self.message, "string is not UTF-8"))
    }
    fn runs(&mut self) -> Result<Vec<Run>, ProtocolError> {
        let n = self.u32()? as usize;
        // Each run takes 12 bytes: a count beyond what is left is a lie.
        if n > self.buf.len() / 12 {
            return Err(malformed(self.message, "more runs than bytes"));
        }
        let mut runs = Vec::with_capacity(n);
        for _ in 0..n {
            let first_page = self.u64()?;
            let count = self.u32()?;
            if count == 0 || first_page.checked_add(u64::from(count)).is_none() {
                return Err(malformed(self.message, "empty or overflowing run"));
            }
            runs.push(Run { first_page, count });
        }
        Ok(runs)
    }
    fn end(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.message, "trailing bytes"))
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Truncate at a char boundary to the bound the reader accepts.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Writes the run table of a Pages/ZeroPages payload.
pub fn put_runs(out: &mut Vec<u8>, runs: &[Run]) {
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.first_page.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
    }
}

/// The bytes a run table takes.
pub fn runs_len(n: usize) -> usize {
    4 + 12 * n
}

/// Encodes a message: (frame type, payload).
pub fn encode(msg: &Message) -> (u8, Vec<u8>) {
    let mut p = Vec::new();
    let t = match msg {
        Message::Hello(h) => {
            p.extend_from_slice(&h.format_version.to_le_bytes());
            put_string(&mut p, &h.vmm_version);
            p.extend_from_slice(&h.machine.ram_size.to_le_bytes());
            p.extend_from_slice(&h.machine.vcpus.to_le_bytes());
            let n = h.machine.devices.len().min(MAX_DEVICES);
            p.extend_from_slice(&(n as u32).to_le_bytes());
            for d in &h.machine.devices[..n] {
                put_string(&mut p, &d.kind);
                put_string(&mut p, &d.id);
            }
            ty::HELLO
        }
        Message::Accept => ty::ACCEPT,
        Message::Refuse { reason } => {
            put_string(&mut p, reason);
            ty::REFUSE
        }
        Message::Pages { runs, data } => {
            put_runs(&mut p, runs);
            p.extend_from_slice(data);
            ty::PAGES
        }
        Message::ZeroPages { runs } => {
            put_runs(&mut p, runs);
            ty::ZERO_PAGES
        }
        Message::Round { n } => {
            p.extend_from_slice(&n.to_le_bytes());
            ty::ROUND
        }
        Message::State(b) => {
            p.extend_from_slice(b);
            ty::STATE
        }
        Message::Complete => ty::COMPLETE,
        Message::Restored => ty::RESTORED,
        Message::Commit => ty::COMMIT,
        Message::Resumed => ty::RESUMED,
        Message::Abort { reason } => {
            put_string(&mut p, reason);
            ty::ABORT
        }
        Message::Handover(items) => {
            let n = items.len().min(MAX_HANDOVER_ITEMS);
            p.push(n as u8);
            for item in &items[..n] {
                match item {
                    Handed::Memory { host_addrs } => {
                        p.push(0);
                        let n = host_addrs.len().min(MAX_RAM_RANGES);
                        p.push(n as u8);
                        for a in &host_addrs[..n] {
                            p.extend_from_slice(&a.to_le_bytes());
                        }
                    }
                    Handed::VhostUser { id, socket } => {
                        p.push(1);
                        put_string(&mut p, id);
                        put_string(&mut p, socket);
                    }
                }
            }
            ty::HANDOVER
        }
    };
    (t, p)
}

/// Decodes a frame, checking every length against the bytes present.
pub fn decode(t: u8, payload: Vec<u8>) -> Result<Message, ProtocolError> {
    let name = match t {
        ty::HELLO => "Hello",
        ty::REFUSE => "Refuse",
        ty::PAGES => "Pages",
        ty::ZERO_PAGES => "ZeroPages",
        ty::ROUND => "Round",
        ty::ABORT => "Abort",
        ty::HANDOVER => "Handover",
        ty::STATE => return Ok(Message::State(payload)),
        ty::ACCEPT | ty::COMPLETE | ty::RESTORED | ty::COMMIT | ty::RESUMED => {
            if !payload.is_empty() {
                return Err(malformed("empty", "unexpected payload"));
            }
            return Ok(match t {
                ty::ACCEPT => Message::Accept,
                ty::COMPLETE => Message::Complete,
                ty::RESTORED => Message::Restored,
                ty::COMMIT => Message::Commit,
                _ => Message::Resumed,
            });
        }
        other => return Err(TransportError::UnknownType(other).into()),
    };
    let mut r = Reader {
        buf: &payload,
        message: name,
    };
    let msg = match t {
        ty::HELLO => {
            let format_version = r.u32()?;
            let vmm_version = r.string()?;
            let ram_size = r.u64()?;
            let vcpus = r.u32()?;
            let n = r.u32()? as usize;
            if n > MAX_DEVICES {
                return Err(malformed(name, "too many devices"));
            }
            let mut devices = Vec::with_capacity(n.min(r.buf.len() / 4));
            for _ in 0..n {
                let kind = r.string()?;
                let id = r.string()?;
                devices.push(DeviceId { kind, id });
            }
            Message::Hello(Hello {
                format_version,
                vmm_version,
                machine: Machine {
                    ram_size,
                    vcpus,
                    devices,
                },
            })
        }
        ty::REFUSE => Message::Refuse {
            reason: r.string()?,
        },
        ty::ABORT => Message::Abort {
            reason: r.string()?,
        },
        ty::ROUND => Message::Round { n: r.u32()? },
        ty::HANDOVER => {
            let n = usize::from(r.take(1)?[0]);
            if n > MAX_HANDOVER_ITEMS {
                return Err(malformed(name, "too many items"));
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(match r.take(1)?[0] {
                    0 => {
                        let n = usize::from(r.take(1)?[0]);
                        if n > MAX_RAM_RANGES {
                            return Err(malformed(name, "too many RAM ranges"));
                        }
                        let host_addrs = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                        Handed::Memory { host_addrs }
                    }
                    1 => Handed::VhostUser {
                        id: r.string()?,
                        socket: r.string()?,
                    },
                    k => return Err(malformed(name, format!("unknown item kind {k}"))),
                });
            }
            Message::Handover(items)
        }
        ty::ZERO_PAGES => Message::ZeroPages { runs: r.runs()? },
        ty::PAGES => {
            let runs = r.runs()?;
            let pages: u64 = runs.iter().map(|r| u64::from(r.count)).sum();
            if pages.checked_mul(PAGE_SIZE as u64) != Some(r.buf.len() as u64) {
                return Err(malformed(
                    name,
                    format!("{pages} pages announced, {} bytes present", r.buf.len()),
                ));
            }
            let start = payload.len() - r.buf.len();
            let mut data = payload;
            data.drain(..start);
            return Ok(Message::Pages { runs, data });
        }
        _ => unreachable!("types matched above"),
    };
    r.end()?;
    Ok(msg)
}

/// Sends a message.
pub fn send(conn: &mut Connection, msg: &Message) -> Result<(), ProtocolError> {
    let (t, p) = encode(msg);
    conn.send_frame(t, &p)?;
    Ok(())
}

/// Sends a Handover with its descriptors (one per item).
pub fn send_handover(
    conn: &mut Connection,
    items: &[Handed],
    fds: &[std::os::fd::RawFd],
) -> Result<(), ProtocolError> {
    let (t, p) = encode(&Message::Handover(items.to_vec()));
    conn.send_frame_with_fds(t, &p, fds)?;
    Ok(())
}

/// Receives and decodes one message.
pub fn recv(conn: &mut Connection) -> Result<Message, ProtocolError> {
    let f = conn.recv_frame(known_type)?;
    decode(f.ty, f.payload)
}

/// The most page data one Pages message may carry, leaving room for its
/// run table.
pub const MAX_PAGES_PER_MESSAGE: usize = (MAX_FRAME_LEN as usize / 2) / PAGE_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Message::Hello(Hello {
                format_version: 1,
                vmm_version: "0.1.0".into(),
                machine: Machine {
                    ram_size: 1 << 30,
                    vcpus: 4,
                    devices: vec![DeviceId {
                        kind: "virtio-blk".into(),
                        id: "root".into(),
                    }],
                },
            }),
            Message::Accept,
            Message::Refuse {
                reason: "no".into(),
            },
            Message::Pages {
                runs: vec![
                    Run {
                        first_page: 3,
                        count: 2,
                    },
                    Run {
                        first_page: 9,
                        count: 1,
                    },
                ],
                data: (0..3 * PAGE_SIZE).map(|i| i as u8).collect(),
            },
            Message::ZeroPages {
                runs: vec![Run {
                    first_page: 0,
                    count: 7,
                }],
            },
            Message::Round { n: 5 },
            Message::State(b"{}".to_vec()),
            Message::Complete,
            Message::Restored,
            Message::Commit,
            Message::Resumed,
            Message::Abort {
                reason: "bye".into(),
            },
            Message::Handover(vec![
                Handed::Memory {
                    host_addrs: vec![0x7f00_0000_0000, 0x7f10_0000_0000],
                },
                Handed::VhostUser {
                    id: "root".into(),
                    socket: "/run/kiln/vol.sock".into(),
                },
            ]),
            Message::Handover(Vec::new()),
        ];
        for m in msgs {
            let (t, p) = encode(&m);
            assert_eq!(decode(t, p).unwrap(), m);
        }
    }

    #[test]
    fn a_handover_listing_too_much_or_unknown_items_is_refused() {
        let mut p = vec![MAX_HANDOVER_ITEMS as u8 + 1];
        p.extend(std::iter::repeat_n(0u8, MAX_HANDOVER_ITEMS + 1));
        assert!(decode(ty::HANDOVER, p).is_err());
        assert!(decode(ty::HANDOVER, vec![1, 7]).is_err());
        assert!(decode(ty::HANDOVER, vec![1, 1, 5, 0]).is_err());
        assert!(decode(ty::HANDOVER, vec![2, 0, 0]).is_err());
        assert!(decode(ty::HANDOVER, vec![1, 0, 1, 0]).is_err());
        assert!(decode(ty::HANDOVER, vec![1, 0, 9]).is_err());
    }

    #[test]
    fn lying_lengths_are_refused() {
        // Pages announcing more pages than bytes present.
        let mut p = Vec::new();
        put_runs(
            &mut p,
            &[Run {
                first_page: 0,
                count: 2,
            }],
        );
        p.extend_from_slice(&[0; PAGE_SIZE]);
        let e = decode(ty::PAGES, p).unwrap_err();
        assert!(e.to_string().contains("2 pages announced"), "{e}");
        // A run count far beyond the payload: refused before allocating.
        let e = decode(ty::ZERO_PAGES, u32::MAX.to_le_bytes().to_vec()).unwrap_err();
        assert!(e.to_string().contains("more runs than bytes"), "{e}");
        // A string length past the end.
        let mut p = Vec::new();
        p.extend_from_slice(&100u16.to_le_bytes());
        p.extend_from_slice(b"short");
        assert!(decode(ty::REFUSE, p).is_err());
        // Trailing bytes, payload on an empty message, unknown type.
        assert!(decode(ty::ROUND, vec![0; 5]).is_err());
        assert!(decode(ty::COMPLETE, vec![0]).is_err());
        assert!(matches!(
            decode(200, vec![]),
            Err(ProtocolError::Transport(TransportError::UnknownType(200)))
        ));
        // A zero-length run.
        let mut p = Vec::new();
        put_runs(
            &mut p,
            &[Run {
                first_page: 1,
                count: 0,
            }],
        );
        assert!(decode(ty::ZERO_PAGES, p).is_err());
    }
}
