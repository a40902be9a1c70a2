//! The serial console on a Unix socket (`--serial socket:PATH`).
//!
//! Clients attach and detach at any time; the guest never waits for them.
//! The last [`RING_BYTES`] of output are kept in a ring: a client that
//! attaches first gets those, then live output, which every attached
//! client receives. What a client writes goes to the guest's serial input.
//!
//! Output is written by the vCPU thread that runs the UART, with
//! non-blocking writes: a client that cannot take its output (it stopped
//! reading) is disconnected rather than let it stall the guest. Only the
//! main thread's event loop accepts, reads from and closes clients.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kiln_devices::legacy::SerialDevice;
use vmm_sys_util::epoll::EventSet;

/// Output kept for clients that attach later.
pub const RING_BYTES: usize = 64 << 10;

/// The last `cap` bytes written.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(cap),
            cap,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(bytes);
    }

    /// The kept bytes, oldest first, in at most two pieces.
    pub fn contents(&self) -> (&[u8], &[u8]) {
        self.buf.as_slices()
    }
}

struct Client {
    file: File,
    /// Output could not be written: the client is being disconnected.
    dead: bool,
}

/// The ring and the attached clients.
pub struct ConsoleHub {
    ring: Ring,
    clients: Vec<Client>,
}

impl ConsoleHub {
    pub fn new() -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            ring: Ring::new(RING_BYTES),
            clients: Vec::new(),
        }))
    }

    /// Keeps `bytes` and sends them to every live client.
    fn output(&mut self, bytes: &[u8]) {
        self.ring.push(bytes);
        for c in self.clients.iter_mut().filter(|c| !c.dead) {
            if !write_fully(&c.file, bytes) {
                hang_up(&mut *c);
            }
        }
    }

    /// Attaches a client: the kept output first, then live output.
    fn attach(&mut self, file: File) {
        let (a, b) = self.ring.contents();
        let mut c = Client { file, dead: false };
        if !(write_fully(&c.file, a) && write_fully(&c.file, b)) {
            hang_up(&mut c);
        }
        self.clients.push(c);
    }

    fn client(&self, fd: RawFd) -> Option<&Client> {
        self.clients.iter().find(|c| c.file.as_raw_fd() == fd)
    }

    fn detach(&mut self, fd: RawFd) {
        self.clients.retain(|c| c.file.as_raw_fd() != fd);
    }
}

/// One non-blocking write of all of `bytes`; false if the client did not
/// take them all.
fn write_fully(mut file: &File, bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    matches!(file.write(bytes), Ok(n) if n == bytes.len())
}

/// Marks a client dead and shuts its socket down, which wakes the event
/// loop (hang-up) to close it.
fn hang_up(c: &mut Client) {
    if !c.dead {
        c.dead = true;
        tracing::info!("console: a client that does not keep up with the output is disconnected");
        // SAFETY: shutdown on a descriptor this client owns.
        unsafe { libc::shutdown(c.file.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn lock(hub: &Mutex<ConsoleHub>) -> MutexGuard<'_, ConsoleHub> {
    hub.lock().unwrap_or_else(|e| e.into_inner())
}

/// The UART's output: into the hub.
pub struct HubWriter(pub Arc<Mutex<ConsoleHub>>);

impl Write for HubWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        lock(&self.0).output(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket's side of the event loop: accepts clients and forwards
/// their input to the UART, pausing a client while the receive FIFO is
/// full.
pub struct ConsoleSocket {
    listener: UnixListener,
    hub: Arc<Mutex<ConsoleHub>>,
    serial: Arc<Mutex<SerialDevice>>,
    ready_fd: RawFd,
    /// Clients not polled until the guest drains the FIFO.
    waiting: Vec<RawFd>,
}

impl ConsoleSocket {
    /// `listener` must be non-blocking.
    pub fn new(
        listener: UnixListener,
        hub: Arc<Mutex<ConsoleHub>>,
        serial: Arc<Mutex<SerialDevice>>,
    ) -> Self {
        let ready_fd = serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_ready_eventfd()
            .as_raw_fd();
        Self {
            listener,
            hub,
            serial,
            ready_fd,
            waiting: Vec::new(),
        }
    }

    fn client_events(fd: RawFd) -> Events {
        Events::new_raw(
            fd,
            EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP,
        )
    }

    fn accept(&mut self, ops: &mut EventOps) {
        // accept4 with SOCK_NONBLOCK: the client is non-blocking from the
        // start (no FIONBIO ioctl, which the main thread's filter forbids).
        // SAFETY: a listening socket we own; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!("console: accept failed: {e}");
            }
            return;
        }
        // SAFETY: accept4 just returned this descriptor to us alone.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        lock(&self.hub).attach(file);
        if let Err(e) = ops.add(Self::client_events(fd)) {
            tracing::warn!("console: cannot poll a client: {e}");
            lock(&self.hub).detach(fd);
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        let _ = ops.remove(Self::client_events(fd));
        self.waiting.retain(|w| *w != fd);
        lock(&self.hub).detach(fd);
    }

    /// Forwards what the client sent, as much as the FIFO takes.
    fn pump(&mut self, fd: RawFd, ops: &mut EventOps) {
        // Lock order: serial, then hub (a vCPU writing output holds the
        // serial port while it takes the hub).
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_room();
        if room == 0 {
            let _ = ops.remove(Self::client_events(fd));
            self.waiting.push(fd);
            return;
        }
        let mut buf = [0u8; 64];
        let n = room.min(buf.len());
        let read = {
            let hub = lock(&self.hub);
            match hub.client(fd) {
                Some(c) if !c.dead => (&c.file).read(&mut buf[..n]),
                _ => Ok(0),
            }
        };
        match read {
            Ok(0) => {
                drop(serial);
                self.close(fd, ops);
            }
            Ok(k) => {
                serial.push_input(&buf[..k]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                drop(serial);
                self.close(fd, ops);
            }
        }
    }
}

impl MutEventSubscriber for ConsoleSocket {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.listener, EventSet::IN))
            .expect("a fresh epoll accepts the console socket");
        if let Err(e) = ops.add(Events::new_raw(self.ready_fd, EventSet::IN)) {
            tracing::warn!("console input: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.ready_fd {
            let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let _ = serial.input_ready_eventfd().read();
            drop(serial);
            for w in std::mem::take(&mut self.waiting) {
                if ops.add(Self::client_events(w)).is_err() {
                    lock(&self.hub).detach(w);
                }
            }
        } else if events.event_set().contains(EventSet::IN) {
            self.pump(fd, ops);
        } else {
            // Hang-up without data: the client left (or was hung up on).
            self.close(fd, ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(r: &Ring) -> Vec<u8> {
        let (a, b) = r.contents();
        [a, b].concat()
    }

    #[test]
    fn the_ring_keeps_the_last_bytes() {
        let mut r = Ring::new(8);
        assert_eq!(kept(&r), b"");
        r.push(b"abc");
        r.push(b"");
        assert_eq!(kept(&r), b"abc");
        r.push(b"defgh");
        assert_eq!(kept(&r), b"abcdefgh");
        r.push(b"ij");
        assert_eq!(kept(&r), b"cdefghij");
        r.push(b"0123456789ABC");
        assert_eq!(kept(&r), b"56789ABC");
        for b in b"xyz" {
            r.push(&[*b]);
        }
        assert_eq!(kept(&r), b"89ABCxyz");
    }

    #[test]
    fn clients_get_the_ring_then_live_output_and_a_stuck_one_is_dropped() {
        use std::os::unix::net::UnixStream;
        let hub = ConsoleHub::new();
        let mut w = HubWriter(hub.clone());
        w.write_all(b"early ").unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        lock(&hub).attach(File::from(OwnedFd::from(ours)));
        w.write_all(b"late").unwrap();
        let mut got = [0u8; 10];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early late");

        // A client that never reads fills its socket and is hung up on;
        // the writer (the guest) never blocks.
        let chunk = vec![b'x'; 4096];
        for _ in 0..1024 {
            w.write_all(&chunk).unwrap();
        }
        assert!(lock(&hub).clients[0].dead);
        let fd = lock(&hub).clients[0].file.as_raw_fd();
        lock(&hub).detach(fd);
        assert!(lock(&hub).clients.is_empty());
    }
}
