//! The virtio-blk queue workers: epoll wiring around [`QueueServer`]s.
//!
//! A device's queues are shared out among its worker threads (one or more
//! queues each, see `Block`), and each queue has its own engine (an
//! io_uring, or a thread pool). Queues are independent in virtio-blk, and
//! the guest's blk-mq maps each vCPU to one queue, so threads may serve
//! vCPUs in parallel with no lock between queues: a ring has one submitter
//! (io_uring wants that), the used ring one writer, and a queue's requests
//! stay on one thread. A thread that serves several queues interrupts the
//! guest at most once per wakeup for all of them: they share the device's
//! one interrupt. Within a queue the thread never waits for I/O: it starts
//! requests, goes back to epoll, and completes them as the engine's eventfd
//! fires.

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
use crate::virtio::queue::{needs_notification, notify_if_needed};
use crate::virtio::worker::{drain_eventfd, EventSetPoller, TOKEN_STOP};

const TOKEN_RATE_LIMIT: u64 = 1;
/// Queue `i`'s eventfd is `TOKEN_QUEUES + 2 * i`, its engine's the next.
const TOKEN_QUEUES: u64 = 2;

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
    pub(super) server: QueueServer,
    pub(super) limiter: Option<SharedRateLimiter>,
    siblings: Vec<Arc<EventFd>>,
    handback: QueueHandback,
}

impl BlockWorker {
    /// Builds the body (on the activating vCPU thread: no syscalls).
    pub(super) fn new(
        ctx: &QueueContext,
        queue: Queue,
        queue_evt: Arc<EventFd>,
        engine: Option<&EngineSlot>,
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
            limiter: ctx.limiter.clone(),
            siblings,
            handback,
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
        if self.start_requests() > 0 {
            notify_if_needed(&mut self.queue, self.server.mem(), &self.interrupt);
        }
    }

    /// Completes the requests whose I/O finished, starts those that were
    /// waiting for it, and interrupts the guest once for the batch.
    #[cfg(test)]
    pub(super) fn reap(&mut self) {
        if self.finish_io() > 0 {
            notify_if_needed(&mut self.queue, self.server.mem(), &self.interrupt);
        }
    }

    /// [`BlockWorker::process_queue`] without the interrupt: how many
    /// requests went to the used ring.
    fn start_requests(&mut self) -> usize {
        let mut limiter = self.limiter.as_ref().map(|l| lock(l));
        self.server
            .process_queue(&mut self.queue, limiter.as_deref_mut())
    }

    /// [`BlockWorker::reap`] without the interrupt: how many requests went
    /// to the used ring.
    fn finish_io(&mut self) -> usize {
        let mut used = self.server.reap(&mut self.queue);
        if self.server.is_stalled() {
            used += self.start_requests();
        }
        used
    }

    /// Whether the guest wants to hear of the used entries added since the
    /// last interrupt (asked of a queue that added some).
    fn wants_interrupt(&mut self) -> bool {
        needs_notification(&mut self.queue, self.server.mem())
    }
}

/// The body of one worker thread: serves its share of a device's queues
/// from one epoll set. Each wakeup handles every ready event, then
/// interrupts the guest once if any queue that used entries asks for it.
pub(super) struct QueueSet {
    queues: Vec<BlockWorker>,
    interrupt: Arc<Interrupt>,
    limiter: Option<SharedRateLimiter>,
    quiescing: Arc<AtomicBool>,
    /// The worker thread's stop eventfd, already in `poller`.
    stop: Arc<EventFd>,
    /// The worker thread's epoll set.
    poller: Arc<EventSetPoller>,
}

/// An fd a [`QueueSet`] registered in its epoll set, to unregister.
#[derive(Clone, Copy)]
enum Registered {
    Queue(usize),
    Engine(usize),
    Limiter,
}

impl QueueSet {
    /// Builds the body (on the activating vCPU thread: no syscalls).
    /// `queues` must not be empty and all belong to the context's device.
    pub(super) fn new(
        ctx: &QueueContext,
        queues: Vec<BlockWorker>,
        poller: Arc<EventSetPoller>,
        stop: Arc<EventFd>,
    ) -> Self {
        Self {
            queues,
            interrupt: ctx.interrupt.clone(),
            limiter: ctx.limiter.clone(),
            quiescing: ctx.quiescing.clone(),
            stop,
            poller,
        }
    }

    /// The thread body: registers each queue's eventfd and engine and the
    /// rate limiter's timer in the worker's epoll set, serves the queues
    /// until told to stop, waits for the I/O in flight, and unregisters
    /// them (the epoll set outlives this activation). When the device is
    /// quiesced, the I/O in flight is completed in the used rings (and the
    /// guest interrupted) rather than dropped. Either way each queue is
    /// left in its handback slot.
    pub(super) fn run(mut self) {
        let registered = self.register();
        if let Some(registered) = &registered {
            self.serve();
            self.unregister(registered);
        }
        let quiescing = self.quiescing.load(Ordering::Acquire);
        for mut q in self.queues {
            if quiescing {
                q.complete_in_flight();
            }
            let BlockWorker {
                server,
                queue,
                handback,
                ..
            } = q;
            // Waits for the I/O in flight before guest memory may go.
            drop(server);
            *handback.lock().unwrap_or_else(|e| e.into_inner()) = Some(queue);
        }
    }

    /// Registers every fd; on a failure, unregisters those that were and
    /// returns None (the worker then stops serving).
    fn register(&self) -> Option<Vec<Registered>> {
        let mut done = Vec::new();
        let mut wanted = Vec::new();
        for i in 0..self.queues.len() {
            wanted.push(Registered::Queue(i));
            if self.queues[i].server.notifier().is_some() {
                wanted.push(Registered::Engine(i));
            }
        }
        if self.limiter.is_some() {
            wanted.push(Registered::Limiter);
        }
        for what in wanted {
            let r = match what {
                Registered::Queue(i) => self.poller.add(&*self.queues[i].queue_evt, queue_token(i)),
                Registered::Engine(i) => match self.queues[i].server.notifier() {
                    Some(n) => self.poller.add(n, queue_token(i) + 1),
                    None => Ok(()),
                },
                Registered::Limiter => match &self.limiter {
                    Some(l) => self.poller.add(&*lock(l), TOKEN_RATE_LIMIT),
                    None => Ok(()),
                },
            };
            match r {
                Ok(()) => done.push(what),
                Err(e) => {
                    error!(
                        "virtio-blk worker: cannot poll {}, stopping: {e}",
                        describe(what)
                    );
                    self.unregister(&done);
                    return None;
                }
            }
        }
        Some(done)
    }

    fn unregister(&self, registered: &[Registered]) {
        for &what in registered {
            let r = match what {
                Registered::Queue(i) => self.poller.remove(&*self.queues[i].queue_evt),
                Registered::Engine(i) => match self.queues[i].server.notifier() {
                    Some(n) => self.poller.remove(n),
                    None => Ok(()),
                },
                Registered::Limiter => match &self.limiter {
                    Some(l) => self.poller.remove(&*lock(l)),
                    None => Ok(()),
                },
            };
            if let Err(e) = r {
                error!(
                    "virtio-blk worker: cannot stop polling {}: {e}",
                    describe(what)
                );
            }
        }
    }

    fn serve(&mut self) {
        // Requests queued before activation completed.
        let mut used = vec![0usize; self.queues.len()];
        for (i, q) in self.queues.iter_mut().enumerate() {
            used[i] += q.start_requests();
        }
        self.interrupt_once(&mut used);
        let mut events = vec![EpollEvent::default(); 2 + 2 * self.queues.len()];
        loop {
            let n = match self.poller.wait(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    error!("virtio-blk worker: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            let mut stopping = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        // Nothing new starts once told to stop.
                        drain_eventfd(&self.stop);
                        stopping = true;
                        break;
                    }
                    TOKEN_RATE_LIMIT => {
                        // The first queue reads the timer and kicks the
                        // others (here or on other threads) through their
                        // eventfds.
                        if let Some(q) = self.queues.first_mut() {
                            q.rate_limit_timer_fired();
                        }
                    }
                    token => {
                        let Some((i, is_engine)) = queue_of(token) else {
                            continue;
                        };
                        let Some(q) = self.queues.get_mut(i) else {
                            continue;
                        };
                        if is_engine {
                            used[i] += q.finish_io();
                        } else {
                            drain_eventfd(&q.queue_evt);
                            used[i] += q.start_requests();
                        }
                    }
                }
            }
            // Before stopping too: the guest hears of what this wakeup
            // completed.
            self.interrupt_once(&mut used);
            if stopping {
                return;
            }
        }
    }

    /// Asks each queue that used entries whether the guest wants to hear of
    /// them (each must be asked: it tracks what it signalled), and raises
    /// the device's interrupt once if any does. Clears `used`.
    fn interrupt_once(&mut self, used: &mut [usize]) {
        let mut wanted = false;
        for (q, n) in self.queues.iter_mut().zip(used.iter_mut()) {
            if *n > 0 {
                wanted |= q.wants_interrupt();
                *n = 0;
            }
        }
        if wanted {
            if let Err(e) = self.interrupt.signal_used_queue() {
                error!("virtio-blk worker: cannot raise the device interrupt: {e}");
            }
        }
    }
}

/// The epoll token of the `i`th queue of a [`QueueSet`] (its engine's is
/// the next).
fn queue_token(i: usize) -> u64 {
    TOKEN_QUEUES + 2 * i as u64
}

/// The queue an epoll token stands for, and whether it is the queue's
/// engine (rather than its eventfd); None for the fixed tokens.
fn queue_of(token: u64) -> Option<(usize, bool)> {
    let slot = token.checked_sub(TOKEN_QUEUES)?;
    Some((usize::try_from(slot / 2).ok()?, slot & 1 == 1))
}

fn describe(what: Registered) -> String {
    match what {
        Registered::Queue(i) => format!("queue {i}'s eventfd"),
        Registered::Engine(i) => format!("queue {i}'s I/O engine"),
        Registered::Limiter => "the rate limiter".to_string(),
    }
}
