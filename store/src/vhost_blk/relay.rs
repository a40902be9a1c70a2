//! The frontend's connection, relayed to the vhost-user library.
//!
//! `vhost-user-backend` hands the backend-request channel (the socket a
//! frontend sends with `SET_BACKEND_REQ_FD`) to the backend wrapped in a
//! `Backend` that, in vhost 0.18, cannot send `CONFIG_CHANGE_MSG`. So the
//! export accepts the frontend itself and relays its messages, unchanged,
//! to the library on a private socket, keeping a copy of that one channel:
//! then a resize can announce the new capacity to the frontend
//! ([`BackendChannel::config_changed`]). Messages are checked only for
//! framing (header, payload of at most [`MAX_PAYLOAD`] bytes, at most
//! [`MAX_FDS`] descriptors); the library validates them.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (u32 LE each).
const HEADER: usize = 12;
/// Largest payload relayed (the library's own limit, `MAX_MSG_SIZE`).
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 32;
/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;

/// The backend-request channel of the connected frontend, if it sent one.
#[derive(Default)]
pub struct BackendChannel(Mutex<Option<UnixStream>>);

impl BackendChannel {
    fn set(&self, s: Option<UnixStream>) {
        *self.0.lock().expect(crate::POISONED) = s;
    }

    /// Sends `CONFIG_CHANGE_MSG` (no reply asked): the frontend rereads the
    /// config space. `Ok(false)` when the frontend gave no channel.
    pub fn config_changed(&self) -> std::io::Result<bool> {
        let mut guard = self.0.lock().expect(crate::POISONED);
        let Some(s) = guard.as_mut() else {
            return Ok(false);
        };
        let mut msg = [0u8; HEADER];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        s.write_all(&msg)?;
        Ok(true)
    }
}

/// Relays `frontend` ⇄ `library` until either side closes; the channel is
/// forgotten then. Returns the two relay threads.
pub fn start(
    frontend: UnixStream,
    library: UnixStream,
    channel: Arc<BackendChannel>,
) -> std::io::Result<(JoinHandle<()>, JoinHandle<()>)> {
    let (f2, l2) = (frontend.try_clone()?, library.try_clone()?);
    let ch = channel.clone();
    let up = std::thread::Builder::new()
        .name("vhost-relay-in".into())
        .spawn(move || {
            if let Err(e) = relay_requests(&frontend, &library, &ch) {
                tracing::debug!(error = %e, "vhost-user relay: frontend connection ended");
            }
            ch.set(None);
            let _ = library.shutdown(std::net::Shutdown::Both);
            let _ = frontend.shutdown(std::net::Shutdown::Both);
        })?;
    let down = std::thread::Builder::new()
        .name("vhost-relay-out".into())
        .spawn(move || {
            let (mut l, mut f) = (&l2, &f2);
            let _ = std::io::copy(&mut l, &mut f);
            channel.set(None);
            let _ = f2.shutdown(std::net::Shutdown::Both);
            let _ = l2.shutdown(std::net::Shutdown::Both);
        })?;
    Ok((up, down))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Frontend → library, one message at a time, descriptors included.
fn relay_requests(
    frontend: &UnixStream,
    library: &UnixStream,
    channel: &BackendChannel,
) -> std::io::Result<()> {
    let mut hdr = [0u8; HEADER];
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HEADER,
        }];
        // SAFETY: the iovec points at `hdr`, which is ours, writable and
        // HEADER bytes long; received descriptors are put in `raw` and
        // owned below.
        let (n, nfds) = unsafe { frontend.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)]
            .iter()
            .filter(|fd| **fd >= 0)
            // SAFETY: recvmsg just created these descriptors for us; nothing
            // else owns them.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        if n == 0 {
            return Ok(());
        }
        let mut r = frontend;
        r.read_exact(&mut hdr[n..])?;
        let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(bad("vhost-user message too large"));
        }
        r.read_exact(&mut payload[..size])?;
        if request == SET_BACKEND_REQ_FD {
            if let Some(fd) = fds.first() {
                channel.set(Some(UnixStream::from(fd.try_clone()?)));
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let parts: [&[u8]; 2] = [&hdr, &payload[..size]];
        let sent = library
            .send_with_fds(&parts, &raw)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // A short send carried the descriptors with its first bytes.
        let mut all = Vec::with_capacity(HEADER + size);
        all.extend_from_slice(&hdr);
        all.extend_from_slice(&payload[..size]);
        if sent < all.len() {
            let mut w = library;
            w.write_all(&all[sent..])?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_pass_and_the_channel_is_kept() {
        let (front_vmm, front_export) = UnixStream::pair().unwrap();
        let (lib_export, lib_lib) = UnixStream::pair().unwrap();
        let ch = Arc::new(BackendChannel::default());
        let (up, down) = start(front_export, lib_export, ch.clone()).unwrap();
        assert!(!ch.config_changed().unwrap());
        // SET_BACKEND_REQ_FD with one end of a pair as its descriptor.
        let (chan_vmm, chan_backend) = UnixStream::pair().unwrap();
        let mut msg = [0u8; HEADER];
        msg[0..4].copy_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        front_vmm
            .send_with_fds(&[&msg[..]], &[chan_backend.as_raw_fd()])
            .unwrap();
        drop(chan_backend);
        let mut got = [0u8; HEADER];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: got.as_mut_ptr().cast(),
            iov_len: HEADER,
        }];
        // SAFETY: the iovec points at `got`, ours and HEADER bytes long.
        let (n, nfds) = unsafe { lib_lib.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (HEADER, 1));
        assert_eq!(got, msg);
        // SAFETY: the descriptor was just received and is ours.
        drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        // A message with a payload, and a reply the other way.
        let mut m = vec![0u8; HEADER + 8];
        m[0..4].copy_from_slice(&1u32.to_le_bytes());
        m[8..12].copy_from_slice(&8u32.to_le_bytes());
        m[12..].copy_from_slice(b"payload!");
        (&front_vmm).write_all(&m).unwrap();
        let mut back = vec![0u8; m.len()];
        (&lib_lib).read_exact(&mut back).unwrap();
        assert_eq!(back, m);
        (&lib_lib).write_all(b"reply").unwrap();
        let mut r = [0u8; 5];
        (&front_vmm).read_exact(&mut r).unwrap();
        assert_eq!(&r, b"reply");
        // The channel now reaches the frontend's end.
        assert!(ch.config_changed().unwrap());
        let mut cc = [0u8; HEADER];
        (&chan_vmm).read_exact(&mut cc).unwrap();
        assert_eq!(
            u32::from_le_bytes(cc[0..4].try_into().unwrap()),
            CONFIG_CHANGE_MSG
        );
        // An oversized message ends the relay.
        let mut huge = [0u8; HEADER];
        huge[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&front_vmm).write_all(&huge).unwrap();
        up.join().unwrap();
        down.join().unwrap();
        assert!(!ch.config_changed().unwrap());
    }
}
