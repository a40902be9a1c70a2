//! The io_uring engine: one ring per queue, its completions signalled on an
//! eventfd registered with the ring (`IORING_REGISTER_EVENTFD`).
//!
//! The ring and the eventfd are set up when the device is built (before the
//! seccomp filters); afterwards the queue worker only calls `io_uring_enter`
//! (submit, and wait while draining) and reads the eventfd. The submission
//! and completion queues are shared memory mapped at setup.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IoDone, IoEngine, IoKind, IoOp};
use crate::virtio::worker::drain_eventfd;

/// An io_uring serving one file descriptor.
pub struct Uring {
    ring: IoUring,
    fd: RawFd,
    notifier: EventFd,
    depth: usize,
    /// Pushed and not yet reaped.
    in_flight: usize,
}

impl Uring {
    /// Sets up a ring with room for `depth` ops on `fd` (the completion
    /// queue is twice the submission queue, so it cannot overflow while at
    /// most `depth` ops are in flight).
    pub fn new(fd: RawFd, depth: usize) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let entries = depth.next_power_of_two() as u32;
        let ring = IoUring::builder().build(entries)?;
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        Ok(Self {
            ring,
            fd,
            notifier,
            depth,
            in_flight: 0,
        })
    }

    fn entry(&self, op: &IoOp) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match op.kind {
            IoKind::Read => opcode::Readv::new(fd, op.iovecs, op.iovcnt)
                .offset(op.offset)
                .build(),
            IoKind::Write => opcode::Writev::new(fd, op.iovecs, op.iovcnt)
                .offset(op.offset)
                .build(),
            IoKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(op.token)
    }

    /// `io_uring_enter`, retried on EINTR; when the kernel is short of
    /// resources (EAGAIN, EBUSY), waits for an op to finish and retries.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        loop {
            let r = if want > 0 {
                self.ring.submit_and_wait(want)
            } else {
                self.ring.submit()
            };
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && self.in_flight > 0
                        && want == 0 =>
                {
                    // Completions free what the kernel needs; reaping them
                    // stays the caller's business (they are in the CQ).
                    match self.ring.submit_and_wait(1) {
                        Ok(_) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl IoEngine for Uring {
    fn push(&mut self, op: IoOp) -> io::Result<()> {
        if self.in_flight >= self.depth {
            return Err(io::Error::other("io_uring: more ops than its depth"));
        }
        let entry = self.entry(&op);
        if self.ring.submission().is_full() {
            self.enter(0)?;
        }
        // SAFETY: the entry's iovecs, and the memory they describe, stay
        // valid until its completion is reaped (IoOp's contract); the fd
        // belongs to the device's backend, which outlives the engine.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter(0)
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        // Clear the notifier first: a completion after the loop sets it again.
        drain_eventfd(&self.notifier);
        for cqe in self.ring.completion() {
            out.push(IoDone {
                token: cqe.user_data(),
                result: i64::from(cqe.result()),
            });
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 || !self.ring.completion().is_empty() {
            return Ok(());
        }
        self.enter(1)
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
