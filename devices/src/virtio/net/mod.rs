//! virtio-net on a host TAP interface.
//!
//! `tx` and `rx` move frames between descriptor chains and a buffer (pure,
//! fuzzable), `worker` is the thread shuttling frames between the queues and
//! the TAP, `device` the model the transport sees, `tap` the TAP itself.
//! `ctrl` answers the control queue, `announce` asks the guest to announce
//! itself after a restore or a migration.

pub mod announce;
pub mod ctrl;
pub mod device;
pub mod mac;
pub mod rx;
pub mod tap;
pub mod tx;
mod worker;

use std::io;
use std::os::fd::AsRawFd;

pub use announce::Announcer;
pub use device::{Error, Net, NetConfig};
pub use mac::{parse_mac, MacAddr, MacError};
pub use tap::{Tap, TapError};

/// The largest frame: a 65535-byte IP packet (GSO) behind a VLAN-tagged
/// Ethernet header, plus the virtio-net header.
pub const MAX_BUFFER_LEN: usize = tap::VNET_HDR_LEN + 14 + 4 + 65535;

/// A packet-oriented, non-blocking frame channel (the TAP; a socket pair in
/// tests). Each call moves one whole frame.
pub trait FrameIo: AsRawFd + Send + Sync {
    /// Reads one frame into `buf`, `WouldBlock` when there is none.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
}

#[cfg(test)]
impl FrameIo for std::os::unix::net::UnixDatagram {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }
}
