//! The virtio-blk device model: features, configuration space, activation.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use tracing::debug;
use tracing::error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;

use super::backend::BlockBackend;
use super::engine::{self, EngineKind, EngineSlot};
use super::io::{Disk, SERIAL_LEN};
use super::raw::{RawFile, RawFileError};
use super::request::{RequestLimits, SECTOR_SHIFT, SECTOR_SIZE};
use super::worker::{BlockWorker, QueueContext, QueueHandback, QueueSet};
use crate::rate_limiter::{self, RateLimit, SharedRateLimiter};
use crate::virtio::device::{ActivateContext, ActivateError, VirtioDevice, WorkerHook};
use crate::virtio::metrics::BlockCounters;
use crate::virtio::state::{DeviceSnapshot, RestoreError, SnapshotError};
use crate::virtio::worker::Worker;

/// Size of each request queue, and the most requests a queue keeps in
/// flight.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues a disk may have (`num_queues`); the VMM further
/// limits it to the VM's vCPU count.
pub const MAX_QUEUES: u16 = 64;
/// Data descriptors per request (the header and status take two slots).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest discard / write-zeroes range, in sectors (2 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Ranges per discard / write-zeroes request.
pub const MAX_RANGES: u32 = 16;
/// Discard granularity advertised to the guest, in sectors (4 KiB).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Bytes of `struct virtio_blk_config` we fill (up to `write_zeroes_may_unmap`).
const CONFIG_LEN: usize = 60;

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

/// What a `--disk` option describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file or host block device.
    pub path: PathBuf,
    /// Expose the disk read-only (`VIRTIO_BLK_F_RO`) and open it `O_RDONLY`.
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub id: Option<String>,
    /// Bytes and requests per second the guest may move (default: no limit).
    pub rate_limit: RateLimit,
    /// Request queues (1 to [`MAX_QUEUES`]); more than one offers
    /// `VIRTIO_BLK_F_MQ`.
    pub queues: u16,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] RawFileError),
    #[error("disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    #[error("the disk is smaller than one 512-byte sector")]
    TooSmall,
    #[error("cannot create the rate limiter's timer: {0}")]
    RateLimiter(#[source] io::Error),
    #[error("{0} queues: a disk has 1 to {MAX_QUEUES}")]
    QueueCount(u16),
}

/// A virtio-blk device.
///
/// One worker thread serves all of the device's queues, each queue with its
/// own I/O engine (see `worker`). Fields drop in order: the workers first
/// (their bodies wait for the I/O in flight and hand the engines back),
/// then the engines, then the disk whose file they use.
pub struct Block {
    name: String,
    /// The worker threads ([`worker_threads`]), spawned by
    /// [`VirtioDevice::spawn_worker`] (or the first activation) and kept
    /// until the device is dropped.
    workers: Vec<Option<Worker>>,
    /// One per queue; empty slots (no engine could be built, or a backend
    /// without a file) serve requests synchronously.
    engines: Vec<EngineSlot>,
    engine_kind: EngineKind,
    engines_built: bool,
    disk: Disk,
    capacity_sectors: u64,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    limiter: Option<SharedRateLimiter>,
    /// The disk in messages: its path, or its id.
    label: String,
    /// Set while [`VirtioDevice::quiesce`] stops the workers.
    quiescing: Arc<AtomicBool>,
    /// One per queue: where its worker leaves the queue when it stops.
    handbacks: Vec<QueueHandback>,
    /// Queues the current activation serves (0: not active).
    active_queues: usize,
}

impl Block {
    /// Opens the raw image `cfg.path` and builds the device around it.
    pub fn new(cfg: BlockConfig) -> Result<Self, Error> {
        let serial = serial(cfg.id.as_deref())?;
        if !(1..=MAX_QUEUES).contains(&cfg.queues) {
            return Err(Error::QueueCount(cfg.queues));
        }
        let backend = RawFile::open(&cfg.path, cfg.read_only, cfg.direct)?;
        let mut block = Self::build(Arc::new(backend), cfg.read_only, serial, cfg.queues)?;
        block.label = cfg.path.display().to_string();
        block.set_rate_limit(cfg.rate_limit)?;
        Ok(block)
    }

    /// Chooses the I/O engine (before [`VirtioDevice::spawn_worker`]);
    /// the default is io_uring, else a thread pool.
    pub fn set_engine(&mut self, kind: EngineKind) {
        self.engine_kind = kind;
    }

    /// The engine each queue got, for logs and tests: "io_uring", "thread
    /// pool", or "none" (synchronous).
    pub fn engine_names(&self) -> Vec<&'static str> {
        self.engines
            .iter()
            .map(|slot| {
                slot.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map_or("none", |e| e.name())
            })
            .collect()
    }

    /// Builds each queue's engine, once; the pool's threads run `hook`.
    fn build_engines(&mut self, hook: Option<WorkerHook>) {
        if self.engines_built {
            return;
        }
        self.engines_built = true;
        let Some(target) = self.disk.backend.async_io() else {
            return;
        };
        for (i, slot) in self.engines.iter().enumerate() {
            match engine::build(
                self.engine_kind,
                target.fd,
                usize::from(QUEUE_SIZE),
                &queue_thread_name(&self.name, i),
                hook.clone(),
            ) {
                Ok(e) => engine::put_back(slot, e),
                Err(e) => error!(
                    device = %self.name,
                    queue = i,
                    "cannot set up asynchronous I/O, serving requests one at a time: {e}"
                ),
            }
        }
    }

    /// The disk's I/O counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.disk.counters.clone()
    }

    /// Limits the guest's bytes and requests per second on this disk.
    /// Creates the limiter's timerfd: call before the VMM is confined.
    pub fn set_rate_limit(&mut self, limit: RateLimit) -> Result<(), Error> {
        self.limiter = rate_limiter::shared(limit).map_err(Error::RateLimiter)?;
        Ok(())
    }

    /// Builds the device around any backend.
    pub fn with_backend(
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
        id: Option<&str>,
    ) -> Result<Self, Error> {
        let mut block = Self::build(backend, read_only, serial(id)?, 1)?;
        if let Some(id) = id {
            block.label = id.to_string();
        }
        Ok(block)
    }

    fn build(
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
        serial: [u8; SERIAL_LEN],
        queues: u16,
    ) -> Result<Self, Error> {
        let capacity_sectors = backend.capacity() >> SECTOR_SHIFT;
        if capacity_sectors == 0 {
            return Err(Error::TooSmall);
        }
        let mut features = (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            if backend.supports_discard() {
                features |= 1u64 << VIRTIO_BLK_F_DISCARD;
            }
            if backend.supports_write_zeroes() {
                features |= 1u64 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        if queues > 1 {
            features |= 1u64 << VIRTIO_BLK_F_MQ;
        }
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        let n = usize::from(queues);
        let name = format!("kiln-blk{index}");
        Ok(Self {
            label: name.clone(),
            quiescing: Arc::default(),
            handbacks: (0..n).map(|_| QueueHandback::default()).collect(),
            active_queues: 0,
            name,
            workers: (0..worker_threads(n)).map(|_| None).collect(),
            engines: (0..n).map(|_| EngineSlot::default()).collect(),
            engine_kind: EngineKind::default(),
            engines_built: false,
            disk: Disk {
                backend,
                read_only,
                serial,
                counters: Arc::default(),
            },
            capacity_sectors,
            avail_features: features,
            config: config_space(capacity_sectors, queues),
            queue_sizes: vec![QUEUE_SIZE; n],
            limiter: None,
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The first worker thread's name (the device's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of request queues.
    pub fn queues(&self) -> usize {
        self.queue_sizes.len()
    }

    fn limits(&self) -> RequestLimits {
        RequestLimits {
            capacity_sectors: self.capacity_sectors,
            seg_max: SEG_MAX,
            max_range_sectors: MAX_RANGE_SECTORS,
            max_ranges: MAX_RANGES,
        }
    }
}

/// The GET_ID serial: the id's bytes, zero-padded.
fn serial(id: Option<&str>) -> Result<[u8; SERIAL_LEN], Error> {
    let mut serial = [0u8; SERIAL_LEN];
    if let Some(id) = id {
        if id.len() > SERIAL_LEN {
            return Err(Error::IdTooLong(id.to_string()));
        }
        serial[..id.len()].copy_from_slice(id.as_bytes());
    }
    Ok(serial)
}

/// How many worker threads serve a device's queues: one, as QEMU's
/// virtio-blk does. With a thread per queue, a two-queue disk in a guest
/// with two vCPUs on the two-CPU test host did 0.31× QEMU's random 4 KiB
/// reads at depth 32 (four busy threads on two CPUs, and an interrupt per
/// queue); with one thread for both it did 1.30× (docs/benchmarks.md).
/// Queue `i` goes to thread `i % threads`, should this grow.
fn worker_threads(_queues: usize) -> usize {
    1
}

/// The name of worker thread `i` of device `name`, and of queue `i`'s I/O
/// pool threads: the device's name for 0, `name`q`i` for the others.
fn queue_thread_name(name: &str, i: usize) -> String {
    match i {
        0 => name.to_string(),
        i => format!("{name}q{i}"),
    }
}

/// `struct virtio_blk_config`, little-endian.
fn config_space(capacity_sectors: u64, queues: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity_sectors.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(34, &queues.to_le_bytes()); // num_queues (read with VIRTIO_BLK_F_MQ)
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE).
        debug!(
            device = %self.name,
            "ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    /// Creates every queue's worker thread and I/O engine (the pool's
    /// threads, if io_uring is unavailable), all running `hook` first.
    fn spawn_worker(&mut self, hook: WorkerHook) -> io::Result<()> {
        for (i, slot) in self.workers.iter_mut().enumerate() {
            Worker::spawn_into(slot, &queue_thread_name(&self.name, i), hook.clone())?;
        }
        self.build_engines(Some(hook));
        Ok(())
    }

    /// Hands each queue the driver set up to its worker thread. A driver may use
    /// fewer queues than offered (one per CPU it has, at most): the others
    /// stay idle.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.workers.iter().flatten().any(Worker::is_busy) {
            return Err(ActivateError::AlreadyActive);
        }
        let got = ctx.queues.len();
        if got == 0 || got > self.queues() || ctx.queue_events.len() != got {
            return Err(ActivateError::QueueCount {
                expected: self.queues(),
                got,
            });
        }
        // Without spawn_worker (tests): engines without a hook.
        self.build_engines(None);
        let shared = QueueContext {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            disk: self.disk.clone(),
            limits: self.limits(),
            limiter: self.limiter.clone(),
            all_queue_events: ctx.queue_events.clone(),
            quiescing: self.quiescing.clone(),
        };
        self.take_handbacks(self.handbacks.len());
        // Queue i goes to thread i % threads.
        let threads = self.workers.len();
        let mut sets: Vec<Vec<BlockWorker>> = (0..threads).map(|_| Vec::new()).collect();
        let queues = ctx.queues.into_iter().zip(ctx.queue_events);
        for (i, (queue, queue_evt)) in queues.enumerate() {
            sets[i % threads].push(BlockWorker::new(
                &shared,
                queue,
                queue_evt,
                self.engines.get(i),
                self.handbacks[i].clone(),
            ));
        }
        for (j, set) in sets.into_iter().enumerate() {
            if set.is_empty() {
                continue;
            }
            let name = queue_thread_name(&self.name, j);
            let worker = match Worker::get_or_spawn(&mut self.workers[j], &name) {
                Ok(w) => w,
                Err(e) => {
                    self.reset();
                    return Err(ActivateError::Spawn(e));
                }
            };
            let body = QueueSet::new(&shared, set, worker.poller(), worker.stop_eventfd());
            if let Err(e) = worker.submit(move || body.run()) {
                self.reset();
                return Err(ActivateError::Worker(e));
            }
        }
        self.active_queues = got;
        Ok(())
    }

    /// Stops every queue's worker; each waits for its I/O in flight.
    fn reset(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            w.stop();
        }
        self.take_handbacks(self.handbacks.len());
        self.active_queues = 0;
    }

    /// Stops every queue's worker; each completes its I/O in flight in the
    /// used ring (interrupting the guest as usual) and hands its queue back.
    fn quiesce(&mut self) -> Result<Vec<Queue>, ActivateError> {
        let n = self.active_queues;
        self.quiescing.store(true, Ordering::Release);
        for w in self.workers.iter_mut().flatten() {
            w.stop();
        }
        self.quiescing.store(false, Ordering::Release);
        self.active_queues = 0;
        let queues = self.take_handbacks(n);
        let got = queues.iter().take_while(|q| q.is_some()).count();
        if got < n {
            return Err(ActivateError::QueueLost(got));
        }
        Ok(queues.into_iter().flatten().collect())
    }

    fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        Ok(DeviceSnapshot::Block(self.state()))
    }

    fn restore(&mut self, state: &DeviceSnapshot) -> Result<(), RestoreError> {
        self.restore_state(state)
    }
}

mod snapshot;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    use crate::virtio::interrupt::Interrupt;
    use crate::virtio::worker::tests::threads_named;
    use kiln_block::request::test_utils::{desc, write_header, DATA, HDR, STATUS, W};

    fn image(len: usize) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(&vec![0u8; len]).unwrap();
        f
    }

    fn cfg(img: &TempFile, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: img.as_path().to_path_buf(),
            read_only,
            direct: false,
            id: Some("disk-0".into()),
            rate_limit: RateLimit::default(),
            queues: 1,
        }
    }

    fn feature(b: &Block, bit: u32) -> bool {
        b.avail_features() & (1u64 << bit) != 0
    }

    #[test]
    fn features_follow_the_config() {
        let img = image(1 << 20);
        let rw = Block::new(cfg(&img, false)).unwrap();
        for bit in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert!(feature(&rw, bit), "bit {bit}");
        }
        assert!(!feature(&rw, VIRTIO_BLK_F_RO));
        assert!(rw.name().starts_with("kiln-blk"));
        assert_eq!(rw.device_type(), VIRTIO_ID_BLOCK);
        let ro = Block::new(cfg(&img, true)).unwrap();
        assert!(feature(&ro, VIRTIO_BLK_F_RO));
        assert!(!feature(&ro, VIRTIO_BLK_F_DISCARD));
        assert!(!feature(&ro, VIRTIO_BLK_F_WRITE_ZEROES));
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let img = image(1 << 20);
        let b = Block::new(cfg(&img, false)).unwrap();
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        assert_eq!(b.capacity_sectors(), 2048);
        let mut v = [0u8; 4];
        b.read_config(12, &mut v);
        assert_eq!(u32::from_le_bytes(v), SEG_MAX);
        b.read_config(20, &mut v);
        assert_eq!(u32::from_le_bytes(v), 512);
        // Past the end reads as zero, even at absurd offsets.
        let mut v = [0xffu8; 4];
        b.read_config(58, &mut v);
        assert_eq!(v, [0; 4]);
        b.read_config(u64::MAX, &mut v);
        assert_eq!(v, [0; 4]);
    }

    #[test]
    fn constructor_errors_are_clear() {
        let img = image(1 << 20);
        let mut c = cfg(&img, false);
        c.id = Some("a-serial-number-that-is-too-long".into());
        assert!(matches!(Block::new(c), Err(Error::IdTooLong(_))));
        let mut c = cfg(&img, false);
        c.path = "/nonexistent/kiln.img".into();
        let Err(e) = Block::new(c) else {
            panic!("opened a missing image")
        };
        assert!(matches!(e, Error::Open(RawFileError::NotFound(_))));
        assert!(e.to_string().contains("/nonexistent/kiln.img"), "{e}");
        let tiny = image(100);
        assert!(matches!(
            Block::new(cfg(&tiny, false)),
            Err(Error::TooSmall)
        ));
    }

    fn wait_for_irq(irq: &EventFd) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while irq.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn worker_serves_requests_and_stops_on_reset() {
        let img = image(1 << 20);
        let mut b = Block::new(cfg(&img, false)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());

        // The worker thread exists before any activation, and runs the hook.
        let hook_tids = Arc::new(Mutex::new(Vec::new()));
        let h = hook_tids.clone();
        b.spawn_worker(Arc::new(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            h.lock().unwrap().push(unsafe { libc::gettid() });
        }))
        .unwrap();
        assert!(b.spawn_worker(Arc::new(|| {})).is_err());
        let tid = hook_tids.lock().unwrap()[0];
        assert_eq!(threads_named(b.name()), vec![tid]);

        for round in 0..2u8 {
            // A rebooted guest sets up fresh rings.
            mem.write_slice(&[0u8; 0x1000], GuestAddress(0)).unwrap();
            let mq = MockSplitQueue::new(&mem, 16);
            let queue = mq.create_queue().unwrap();
            b.activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![queue],
                queue_events: vec![kick.clone()],
                interrupt: interrupt.clone(),
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
            assert!(matches!(
                b.activate(ActivateContext {
                    mem: mem.clone(),
                    queues: vec![],
                    queue_events: vec![],
                    interrupt: interrupt.clone(),
                    acked_features: 0,
                }),
                Err(ActivateError::AlreadyActive)
            ));

            write_header(&mem, VIRTIO_BLK_T_OUT, 1);
            mem.write_slice(&[round + 1; 512], GuestAddress(DATA))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            mq.build_desc_chain(&[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)])
                .unwrap();
            kick.write(1).unwrap();
            wait_for_irq(&irq);
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
                VIRTIO_BLK_S_OK as u8
            );
            assert_eq!(mq.used().idx().load(), 1);
            let mut on_disk = [0u8; 512];
            std::os::unix::fs::FileExt::read_exact_at(img.as_file(), &mut on_disk, 512).unwrap();
            assert!(on_disk.iter().all(|&x| x == round + 1));

            b.reset();
            assert!(!b.workers[0].as_ref().unwrap().is_busy());
            assert!(queue_is_unused(&mq));
            // Still the one thread, hooked once (and the I/O pool's
            // threads, where there is no io_uring, each once).
            assert_eq!(threads_named(b.name()), vec![tid]);
            let pool = match b.engine_names()[..] {
                ["thread pool"] => crate::virtio::block::engine::pool::THREADS,
                _ => 0,
            };
            assert_eq!(hook_tids.lock().unwrap().len(), 1 + pool);
            assert_eq!(hook_tids.lock().unwrap()[0], tid);
        }
        let name = b.name().to_string();
        drop(b);
        assert!(threads_named(&name).is_empty());
    }

    fn queue_is_unused(mq: &MockSplitQueue<GuestMemoryMmap>) -> bool {
        // Nothing left in the avail ring beyond what was used.
        mq.avail().idx().load() == mq.used().idx().load()
    }

    #[test]
    fn activation_needs_one_queue() {
        let img = image(4096);
        let mut b = Block::new(cfg(&img, false)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = b.activate(ActivateContext {
            mem,
            queues: vec![],
            queue_events: vec![],
            interrupt: Arc::new(Interrupt::new(irq)),
            acked_features: 0,
        });
        assert!(matches!(
            r,
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        // Resetting an idle device is fine.
        b.reset();
    }
}
