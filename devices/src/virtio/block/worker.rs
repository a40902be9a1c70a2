//! The virtio-blk queue worker: epoll wiring around a [`QueueServer`].
//!
//! A device has one worker thread per queue, each with its own engine (an
//! io_uring, or a thread pool). Queues are independent in virtio-blk, and
//! the guest's blk-mq maps each vCPU to one queue, so a thread per queue
//! serves vCPUs in parallel with no lock between queues: a ring has one
//! submitter (io_uring wants that), the used ring one writer, and a queue's
//! requests and interrupts stay on one thread. Within a queue the thread
//! never waits for I/O: it starts requests, goes back to epoll, and
//! completes them as the engine's eventfd fires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

use super::engine::EngineSlot;
use super::inflight::QueueServer;
use super::io::Disk;
use super::request::RequestLimits;
use crate::rate_limiter::{lock, SharedRateLimiter};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::queue::notify_if_needed;
use crate::virtio::worker::{drain_eventfd, EventSetPoller, TOKEN_STOP};

const TOKEN_QUEUE: u64 = 1;
const TOKEN_RATE_LIMIT: u64 = 2;
const TOKEN_ENGINE: u64 = 3;

/// What a queue worker needs besides its queue, shared by a device's queues.
pub(super) struct QueueContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub disk: Disk,
    pub limits: RequestLimits,
    /// The device's rate limiter, kept by the device across activations.
    pub limiter: Option<SharedRateLimiter>,
    /// Every queue's notification eventfd: the worker that consumes the
    /// shared rate limiter's timer kicks the others, which may be holding
    /// requests back too.
    pub all_queue_events: Vec<Arc<EventFd>>,
    /// Set while the device is quiesced: a stopping worker completes its
    /// requests in flight instead of dropping them.
    pub quiescing: Arc<AtomicBool>,
}

/// Where a queue's worker leaves its queue when its body returns.
pub(super) type QueueHandback = Arc<Mutex<Option<Queue>>>;

/// Serves one request queue of a block device: the body an activation hands
/// to that queue's worker thread.
pub(super) struct BlockWorker {
    queue: Queue,
    queue_evt: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    /// The worker thread's stop eventfd, already in `poller`.
    stop: Arc<EventFd>,
    /// The worker thread's epoll set.
    poller: Arc<EventSetPoller>,
    pub(super) server: QueueServer,
    pub(super) limiter: Option<SharedRateLimiter>,
    siblings: Vec<Arc<EventFd>>,
    quiescing: Arc<AtomicBool>,
    handback: QueueHandback,
}

impl BlockWorker {
    /// Builds the body (on the activating vCPU thread: no syscalls).
    pub(super) fn new(
        ctx: &QueueContext,
        queue: Queue,
        queue_evt: Arc<EventFd>,
        engine: Option<&EngineSlot>,
        poller: Arc<EventSetPoller>,
        stop: Arc<EventFd>,
        handback: QueueHandback,
    ) -> Self {
        let siblings = ctx
            .all_queue_events
            .iter()
            .filter(|e| !Arc::ptr_eq(e, &queue_evt))
            .cloned()
            .collect();
        Self {
            server: QueueServer::new(ctx.mem.clone(), ctx.disk.clone(), ctx.limits, engine),
            queue,
            queue_evt,
            interrupt: ctx.interrupt.clone(),
            stop,
            poller,
            limiter: ctx.limiter.clone(),
            siblings,
            quiescing: ctx.quiescing.clone(),
            handback,
        }
    }

    /// The thread body: registers the queue's eventfd, the engine's and the
    /// rate limiter's timer in the worker's epoll set, serves the queue
    /// until told to stop, waits for the I/O in flight, and unregisters
    /// them (the epoll set outlives this activation). When the device is
    /// quiesced, the I/O in flight is completed in the used ring (and the
    /// guest interrupted) rather than dropped. Either way the queue is left
    /// in the handback slot.
    pub(super) fn run(mut self) {
        let mut registered: Vec<&str> = Vec::new();
        let mut ok = true;
        let limiter = self.limiter.clone();
        match self.poller.add(&*self.queue_evt, TOKEN_QUEUE) {
            Ok(()) => registered.push("queue"),
            Err(e) => {
                error!("virtio-blk worker: cannot poll the queue eventfd, stopping: {e}");
                ok = false;
            }
        }
        if let Some(n) = self.server.notifier() {
            match self.poller.add(n, TOKEN_ENGINE) {
                Ok(()) => registered.push("engine"),
                Err(e) => {
                    error!("virtio-blk worker: cannot poll the I/O engine, stopping: {e}");
                    ok = false;
                }
            }
        }
        if let Some(l) = &limiter {
            match self.poller.add(&*lock(l), TOKEN_RATE_LIMIT) {
                Ok(()) => registered.push("limiter"),
                Err(e) => {
                    error!("virtio-blk worker: cannot poll the rate limiter, stopping: {e}");
                    ok = false;
                }
            }
        }
        if ok {
            self.serve();
        }
        if self.quiescing.load(Ordering::Acquire) {
            self.complete_in_flight();
        }
        let Self {
            server,
            poller,
            queue_evt,
            queue,
            handback,
            ..
        } = self;
        for what in registered {
            let r = match what {
                "queue" => poller.remove(&*queue_evt),
                "engine" => match server.notifier() {
                    Some(n) => poller.remove(n),
                    None => Ok(()),
                },
                _ => match &limiter {
                    Some(l) => poller.remove(&*lock(l)),
                    None => Ok(()),
                },
            };
            if let Err(e) = r {
                error!("virtio-blk worker: cannot stop polling the {what} fd: {e}");
            }
        }
        // Waits for the I/O in flight before guest memory may go.
        drop(server);
        *handback.lock().unwrap_or_else(|e| e.into_inner()) = Some(queue);
    }

    fn serve(&mut self) {
        // Requests queued before activation completed.
        self.process_queue();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.poller.wait(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    error!("virtio-blk worker: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        drain_eventfd(&self.stop);
                        return;
                    }
                    TOKEN_QUEUE => {
                        drain_eventfd(&self.queue_evt);
                        self.process_queue();
                    }
                    TOKEN_ENGINE => self.reap(),
                    TOKEN_RATE_LIMIT => self.rate_limit_timer_fired(),
                    _ => {}
                }
            }
        }
    }

    /// Waits for the I/O in flight and completes its requests in the used
    /// ring, interrupting the guest if it wants to hear of them; starts no
    /// new request (the device is being quiesced).
    pub(super) fn complete_in_flight(&mut self) {
        let used = self.server.drain_and_complete(&mut self.queue);
        if used > 0 {
            notify_if_needed(&mut self.queue, self.server.mem(), &self.interrupt);
        }
    }

    /// The shared rate limiter's timer fired: requests may go again, on
    /// this queue and on the others, which this worker kicks (the worker
    /// that reads the timer clears it for all of them).
    pub(super) fn rate_limit_timer_fired(&mut self) {
        if let Some(l) = &self.limiter {
            lock(l).timer_expired();
        }
        for q in &self.siblings {
            if let Err(e) = q.write(1) {
                error!("virtio-blk worker: cannot kick a sibling queue: {e}");
            }
        }
        self.process_queue();
    }

    /// Starts every available request, then interrupts the guest if it
    /// wants to know about those that finished already.
    pub(super) fn process_queue(&mut self) {
        let mut limiter = self.limiter.as_ref().map(|l| lock(l));
        let used = self
            .server
            .process_queue(&mut self.queue, limiter.as_deref_mut());
        drop(limiter);
        if used > 0 {
            notify_if_needed(&mut self.queue, self.server.mem(), &self.interrupt);
        }
    }

    /// Completes the requests whose I/O finished, starts those that were
    /// waiting for it, and interrupts the guest once for the batch.
    pub(super) fn reap(&mut self) {
        let mut used = self.server.reap(&mut self.queue);
        if self.server.is_stalled() {
            let mut limiter = self.limiter.as_ref().map(|l| lock(l));
            used += self
                .server
                .process_queue(&mut self.queue, limiter.as_deref_mut());
        }
        if used > 0 {
            notify_if_needed(&mut self.queue, self.server.mem(), &self.interrupt);
        }
    }
}
