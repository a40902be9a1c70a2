//! The `VhostUserBackend` of one exported volume: feature negotiation,
//! config space, and processing of the request queues on kicks: one thread
//! pops the requests of every queue ([`config::QUEUE_THREADS`]), a pool of
//! workers ([`super::workers`]) serves them concurrently (with the popping
//! thread, between pops) and completes each as it finishes.
//! Each queue's
//! [`Gate`] makes `GET_VRING_BASE` wait until every request popped from it
//! is on its used ring, and keeps the ring untouched until it is started
//! again (snapshots and live migration read the used index then).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use kiln_block::request as blk;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{self, ExportOptions};
use super::gate::{Gate, Pass};
use super::request::{self, Device, LogLimiter};
use super::stats::{SessionStats, Summary, Timing};
use super::workers::Workers;
use super::VolumeSource;
use crate::iobuf::IoBuf;
use crate::VolumeIo;

/// Guest memory as the frontend shared it. Every write through it marks
/// the frontend's dirty log while a live migration has one set
/// (`VHOST_F_LOG_ALL`, `SET_LOG_BASE`): the data read into the guest's
/// buffers, the status bytes and the used rings.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;

/// A vhost-user-blk device serving one volume. Cheap to clone (shared).
#[derive(Clone)]
pub struct BlkBackend(Arc<Inner>);

struct Inner {
    name: String,
    source: VolumeSource,
    opts: ExportOptions,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMem>>,
    log: LogLimiter,
    workers: Workers,
    /// One per queue: what `stop_vring` closes.
    gates: Vec<Gate>,
    stats: SessionStats,
}

impl BlkBackend {
    pub fn new(name: &str, source: VolumeSource, opts: ExportOptions) -> io::Result<BlkBackend> {
        Ok(BlkBackend(Arc::new(Inner {
            name: name.to_string(),
            source,
            opts,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            log: LogLimiter::default(),
            workers: Workers::new(name, config::WORKERS)?,
            gates: (0..opts.queues).map(|_| Gate::default()).collect(),
            stats: SessionStats::new(usize::from(opts.queues)),
        })))
    }

    /// How many threads pop the queues (as many masks as
    /// `queues_per_thread` gives).
    fn queue_threads(&self) -> u16 {
        config::popping_threads(self.0.opts.queues, config::QUEUE_THREADS)
    }

    /// Waits until every request taken from a ring is completed (before
    /// the next frontend connects, or a ring stops).
    pub fn drain(&self) {
        self.0.workers.drain();
    }

    /// What the connection that just ended asked and how long its requests
    /// stayed here; the counters start again from zero.
    pub fn take_stats(&self) -> Summary {
        self.0.stats.take()
    }

    /// Pops every available request and hands each to the workers, which
    /// serve it and put it on the used ring when done; while the ring is
    /// empty this thread serves requests not yet taken by a worker itself
    /// (no wake-up to wait for). Small writes to a volume whose replicas
    /// are all on this node (page-cache work, no round trip) it serves at
    /// once, and signals the guest of them together when the ring runs
    /// dry (or [`config::READ_BATCH`] are served). Reads of a volume this
    /// node holds in sync it gathers as it pops and serves together
    /// whenever the ring runs dry (or [`config::READ_BATCH`] are
    /// gathered): their disk reads go to the disk in one submission
    /// ([`VolumeIo::read_batch_each`]), each completed as it lands, with
    /// no hand-off to a worker (handing the batch over so that this thread
    /// could pop on measured slower natively, the wake-up costing more than
    /// the overlap gained, as the disk completes a batch's reads together:
    /// docs/benchmarks.md, session 38). Returns once the ring is empty and no request waits
    /// for a worker, or the queue is stopped. Each request holds a pass of
    /// the queue's gate from before it is popped until its completion is
    /// signalled.
    fn process_queue(&self, vring: &VringRwLock<GuestMem>, queue: usize, gate: &Gate) {
        let Some(atomic) = self.0.mem.read().expect(crate::POISONED).clone() else {
            return;
        };
        let volume: Arc<dyn VolumeIo> = match (self.0.source)() {
            Ok(v) => v,
            Err(e) => {
                if self.0.log.allow() {
                    tracing::warn!(volume = %self.0.name, error = %e, "vhost-user-blk: volume unavailable, failing requests");
                }
                Arc::new(Unavailable)
            }
        };
        // Only hints of where to serve requests: a replica set that
        // changes meanwhile makes a request slower, never wrong.
        let local = volume.writes_stay_local();
        let batch_reads = volume.reads_stay_local();
        let mut reads: Vec<Popped> = Vec::new();
        // Small writes served here that the guest has not been told of:
        // their passes, held until it is.
        let mut untold: Vec<Pass> = Vec::new();
        loop {
            if reads.len() >= config::READ_BATCH {
                self.0
                    .serve_reads(vring, volume.as_ref(), std::mem::take(&mut reads));
            }
            if untold.len() >= config::READ_BATCH {
                self.0.tell(vring, &mut untold);
            }
            // Taken before the pop: a stop either sees this request in
            // flight or finds it still on the avail ring (not popped).
            let popped = gate.enter(|| false).and_then(|pass| {
                let mut state = vring.get_mut();
                // A stopping ring (not ready) has nothing more to give.
                if !state.get_queue().ready() {
                    return None;
                }
                let chain = state.get_queue_mut().pop_descriptor_chain(atomic.memory());
                Some((pass, chain))
            });
            let Some((pass, Some(chain))) = popped else {
                let stopped = popped.is_none();
                self.0.tell(vring, &mut untold);
                // The ring is empty (or stopping): serve the reads
                // gathered, or a request handed over and not yet taken
                // by a worker, then look at the ring again.
                if !reads.is_empty() {
                    self.0
                        .serve_reads(vring, volume.as_ref(), std::mem::take(&mut reads));
                    if !stopped {
                        continue;
                    }
                }
                if !stopped && self.0.workers.run_one() {
                    continue;
                }
                return;
            };
            let timing = self.0.stats.popped(queue);
            // (A read larger than one volume read, rare, goes to a worker.)
            if batch_reads
                && request::is_read_of_at_most(chain.memory(), chain.clone(), crate::MAX_IO)
            {
                reads.push(Popped {
                    chain,
                    pass,
                    timing,
                });
                continue;
            }
            let here = local
                && request::is_write_of_at_most(
                    chain.memory(),
                    chain.clone(),
                    config::INLINE_WRITE_MAX,
                );
            let popped = Popped {
                chain,
                pass,
                timing,
            };
            if here {
                untold.push(self.0.serve_untold(vring, volume.as_ref(), popped));
            } else {
                let (me, vring, volume) = (self.0.clone(), vring.clone(), volume.clone());
                self.0
                    .workers
                    .submit(move || me.serve(&vring, volume.as_ref(), popped));
            }
        }
    }
}

/// A request popped from a ring: its chain, the pass of the queue's gate
/// it holds until its completion is signalled, and its timing.
struct Popped {
    chain: DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<BitmapMmapRegion>>>,
    pass: Pass,
    timing: Timing,
}

impl Inner {
    fn device<'a>(&'a self, volume: &'a dyn VolumeIo) -> Device<'a> {
        Device {
            name: &self.name,
            volume,
            log: &self.log,
            read_only: self.opts.read_only,
        }
    }

    /// Serves reads popped together: their data read at once, each
    /// completed into the guest as it lands; the guest is told once per
    /// round of reads landed ([`VolumeIo::read_batch_each`]), not once per
    /// read nor only once the slowest is in.
    fn serve_reads(
        &self,
        vring: &VringRwLock<GuestMem>,
        volume: &dyn VolumeIo,
        reads: Vec<Popped>,
    ) {
        let dev = self.device(volume);
        self.stats.read_batch(reads.len());
        let mut waiting: Vec<(Popped, blk::Request)> = Vec::with_capacity(reads.len());
        let mut passes = Vec::new();
        for mut r in reads {
            self.stats.started(&mut r.timing);
            match request::parse_read(r.chain.memory(), r.chain.clone(), &dev) {
                Some(req) => waiting.push((r, req)),
                // Not a read it can take: served the ordinary way (which
                // answers what is wrong with it).
                None => {
                    let used = request::handle_chain(r.chain.memory(), r.chain.clone(), &dev);
                    self.complete(vring, r.chain.head_index(), used, r.timing);
                    passes.push(r.pass);
                }
            }
        }
        if !passes.is_empty() {
            self.notify(vring);
            // Only now may the ring stop (its call fd go away).
            passes.clear();
        }
        let ranges: Vec<(u64, usize)> = waiting
            .iter()
            .map(|(_, q)| (q.sector * config::SECTOR_SIZE, q.data_len as usize))
            .collect();
        let mut slots: Vec<Option<(Popped, blk::Request)>> =
            waiting.into_iter().map(Some).collect();
        let finish = |slots: &mut Vec<Option<(Popped, blk::Request)>>,
                      round: Vec<(usize, crate::Result<IoBuf>)>| {
            let mut passes = Vec::with_capacity(round.len());
            for (i, got) in round {
                let Some((r, req)) = slots.get_mut(i).and_then(Option::take) else {
                    continue;
                };
                let used = request::read_into_guest(r.chain.memory(), &req, got, &dev);
                self.complete(vring, r.chain.head_index(), used, r.timing);
                passes.push(r.pass);
            }
            if !passes.is_empty() {
                self.notify(vring);
            }
        };
        volume.read_batch_each(&ranges, &mut |round| finish(&mut slots, round));
        // Every read is answered by now; one that was not is failed rather
        // than left hanging.
        let lost: Vec<(usize, crate::Result<IoBuf>)> = (0..slots.len())
            .filter(|&i| slots[i].is_some())
            .map(|i| {
                (
                    i,
                    Err(crate::Error::Io("no answer for a read of a batch".into())),
                )
            })
            .collect();
        if !lost.is_empty() {
            finish(&mut slots, lost);
        }
    }

    /// Serves one request, completes it and signals the guest (a worker's
    /// job).
    fn serve(&self, vring: &VringRwLock<GuestMem>, volume: &dyn VolumeIo, p: Popped) {
        let pass = self.serve_untold(vring, volume, p);
        self.notify(vring);
        // Only now may the ring stop (its call fd go away).
        drop(pass);
    }

    /// Serves one request and puts it on the used ring without signalling
    /// the guest: the popping thread's small local writes, of which it
    /// tells the guest once for many ([`Inner::tell`]) — each interrupt is
    /// a round of exits for the guest (status read, acknowledge), and on a
    /// loaded host the interrupts of single writes cost more than the
    /// writes. Returns the request's pass, to be dropped once told.
    fn serve_untold(
        &self,
        vring: &VringRwLock<GuestMem>,
        volume: &dyn VolumeIo,
        mut p: Popped,
    ) -> Pass {
        self.stats.started(&mut p.timing);
        let used = request::handle_chain(p.chain.memory(), p.chain.clone(), &self.device(volume));
        self.complete(vring, p.chain.head_index(), used, p.timing);
        p.pass
    }

    /// Signals the guest for requests served untold, if there are any,
    /// then lets their passes go.
    fn tell(&self, vring: &VringRwLock<GuestMem>, untold: &mut Vec<Pass>) {
        if !untold.is_empty() {
            self.notify(vring);
            untold.clear();
        }
    }

    /// Puts a request on the used ring (the guest is signalled apart,
    /// [`Inner::notify`]).
    fn complete(&self, vring: &VringRwLock<GuestMem>, head: u16, used: u32, timing: Timing) {
        let added = vring.add_used(head, used);
        self.stats.completed(timing);
        if let Err(e) = added {
            if self.log.allow() {
                tracing::warn!(volume = %self.name, error = %e, "vhost-user-blk: cannot return a request");
            }
        }
    }

    /// Signals the guest if the used ring's state asks for it.
    fn notify(&self, vring: &VringRwLock<GuestMem>) {
        match vring.needs_notification() {
            Ok(true) | Err(_) => {
                self.stats.interrupted();
                if let Err(e) = vring.signal_used_queue() {
                    tracing::debug!(error = %e, "vhost-user-blk: cannot signal the guest");
                }
            }
            Ok(false) => {}
        }
    }
}

/// Stands in for a volume this daemon no longer writes: every I/O fails.
struct Unavailable;

impl crate::VolumeIo for Unavailable {
    fn size(&self) -> crate::Result<u64> {
        Err(unavailable())
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> crate::Result<()> {
        Err(unavailable())
    }
    fn write_at(&self, _: &[u8], _: u64) -> crate::Result<()> {
        Err(unavailable())
    }
    fn flush(&self) -> crate::Result<()> {
        Err(unavailable())
    }
    fn discard(&self, _: u64, _: u64) -> crate::Result<()> {
        Err(unavailable())
    }
}

fn unavailable() -> crate::Error {
    crate::Error::Unavailable("volume is not attached on this node".into())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.0.opts.queues)
    }

    /// [`config::QUEUE_THREADS`] threads pop the queues (the workers and
    /// they serve the requests).
    fn queues_per_thread(&self) -> Vec<u64> {
        config::queue_masks(self.0.opts.queues, config::QUEUE_THREADS)
    }

    /// Before a ring's state goes back to the frontend, every request
    /// taken from it is on its used ring and signalled, and nothing touches
    /// the ring any more until the frontend starts it again. (The library
    /// has marked the queue not ready before this, so no more pops.)
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        match self.0.gates.get(queue_index as usize) {
            Some(gate) => gate.stop(),
            None => self.drain(),
        }
        Ok(())
    }

    fn max_queue_size(&self) -> usize {
        config::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::features(&self.0.opts)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let capacity = (self.0.source)().and_then(|v| v.size()).unwrap_or(0);
        config::config_window(capacity, self.0.opts.queues, offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no CONFIG_WCE).
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.0.mem.write().expect(crate::POISONED) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<GuestMem>],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here end the queue's worker thread, so
        // nothing the guest does may produce one: problems are logged.
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        // `vrings` are this thread's queues (`queues_per_thread`).
        let threads = self.queue_threads();
        let queue = config::queue_of(thread_id, device_event, threads);
        let Some(gate) = self.0.gates.get(queue) else {
            return Ok(());
        };
        let ready = || vring.get_ref().get_queue().ready();
        // A stopped queue opens again once the frontend has set it up anew
        // (the library marks it ready on SET_VRING_KICK after the stop).
        // The pass covers the notification-suppression writes below.
        let Some(_pass) = gate.enter(ready) else {
            return Ok(());
        };
        self.0.stats.kicked(queue);
        if self.0.event_idx.load(Ordering::Acquire) {
            // Serve until the queue stays empty with notifications on, so a
            // request made available while they were off is not missed.
            loop {
                if vring.disable_notification().is_err() {
                    return Ok(());
                }
                self.process_queue(vring, queue, gate);
                // A stopping ring is left alone (the stop waits for us).
                if gate.is_stopped() || !ready() {
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.process_queue(vring, queue, gate);
        }
        Ok(())
    }
}
