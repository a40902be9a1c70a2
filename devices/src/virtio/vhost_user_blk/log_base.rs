//! `VHOST_USER_SET_LOG_BASE`: handing a backend the dirty log of a live
//! migration ([`crate::dirty::BackendLog`]).
//!
//! Sent by hand rather than through the vhost crate's frontend: backends
//! disagree on the reply. libvhost-user (QEMU's, qemu-storage-daemon)
//! answers with a `u64`; rust-vmm's vhost crate answers with the 16-byte
//! log region it was sent; the crate's frontend waits for the 16 bytes and
//! would hang on a libvhost-user backend. This accepts either.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::dirty::BackendLog;

/// `VHOST_USER_SET_LOG_BASE`.
const SET_LOG_BASE: u32 = 6;
/// Protocol version 1, in every header's flags.
const VERSION_1: u32 = 0x1;
/// A reply's flag.
const REPLY: u32 = 0x4;
/// `struct vhost_user_log`: mmap_size, mmap_offset.
const BODY_LEN: u32 = 16;
/// Header: request, flags, size (all u32, little endian).
const HEADER_LEN: usize = 12;

/// The backend's socket, borrowed by descriptor (the vhost crate's
/// frontend owns it and is not in the middle of a request: this runs on
/// the device's worker, which alone talks to the backend).
struct Socket(RawFd);

impl ScmSocket for Socket {
    fn socket_fd(&self) -> RawFd {
        self.0
    }
}

/// Hands `log` to the backend on `socket` and waits for its reply. The
/// backend must have acked `VHOST_USER_PROTOCOL_F_LOG_SHMFD`. A backend
/// that never answers is the caller's deadline's business (the device's
/// activation hangs up on it).
pub fn set_log_base(socket: RawFd, log: &BackendLog) -> io::Result<()> {
    let socket = Socket(socket);
    let mut msg = Vec::with_capacity(HEADER_LEN + BODY_LEN as usize);
    msg.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
    msg.extend_from_slice(&VERSION_1.to_le_bytes());
    msg.extend_from_slice(&BODY_LEN.to_le_bytes());
    msg.extend_from_slice(&log.mmap_size().to_le_bytes());
    msg.extend_from_slice(&0u64.to_le_bytes());
    let sent = retry(|| socket.send_with_fds(&[msg.as_slice()], &[log.fd().as_raw_fd()]))?;
    if sent != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", msg.len()),
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    recv_exact(&socket, &mut header)?;
    let field =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (field(0), field(4), field(8));
    if request != SET_LOG_BASE || flags & REPLY == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected the reply to SET_LOG_BASE, got request {request} with flags {flags:#x}"
            ),
        ));
    }
    if size > BODY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte reply to SET_LOG_BASE (at most {BODY_LEN})"),
        ));
    }
    let mut body = [0u8; BODY_LEN as usize];
    recv_exact(&socket, &mut body[..size as usize])
}

/// Fills `buf` from the socket; a descriptor the backend attached is
/// closed.
fn recv_exact(socket: &Socket, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let (n, file): (usize, Option<File>) = retry(|| socket.recv_with_fd(&mut buf[got..]))?;
        drop(file);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backend hung up before replying to SET_LOG_BASE",
            ));
        }
        got += n;
    }
    Ok(())
}

/// Runs a socket call again when a signal interrupted it.
fn retry<T>(mut f: impl FnMut() -> vmm_sys_util::errno::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => return r.map_err(|e| io::Error::from_raw_os_error(e.errno())),
        }
    }
}
