//! The source: pre-copy, then switch-over.
//!
//! 1. Hello / Accept.
//! 2. Round 0: all RAM, the dirty log on. Pages that read as zero go as
//!    compact runs ([`Message::ZeroPages`]), not as data.
//! 3. Rounds 1..: the pages dirtied during the previous round, until
//!    sending the dirty set at the bandwidth just measured fits the
//!    downtime target, or rounds stop converging (max rounds, the
//!    pre-copy timeout, or no progress for a few rounds).
//! 4. Pause and save; the last dirty pages, the state, Complete.
//! 5. Wait for Restored (the destination restored the machine, not running
//!    it), send Commit, wait for Resumed: the VM runs on the destination;
//!    the source stays paused and may exit.
//!
//! Any failure before Commit: the source resumes its VM (if it paused
//! it), stops the dirty log, tells the destination (Abort, best effort)
//! and returns the error. The source VM is unharmed. After Commit, an
//! Abort from the destination (it did not run the VM) also resumes it; a
//! lost destination does not: the error is [`MigrationError::in_doubt`]
//! and the VM stays paused (see [`super::protocol`] for why).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::protocol::{self, ty, Handed, Machine, Message, Run, FORMAT_VERSION, PAGE_SIZE};
use super::transport::{self, Address, Connection, TransportConfig};
use super::{fail_connection, recv_at, unwanted, ErrorKind, MigrationError, Stage};

/// What the source VMM provides.
///
/// Page numbers count 4 KiB RAM pages: page `i` is byte `i * 4096` of
/// guest RAM taken as its ranges end to end in guest-address order.
pub trait MigrationSource {
    /// RAM size, vCPUs and devices, for the destination to check.
    fn machine(&self) -> Machine;
    /// Copies `buf.len() / 4096` pages from `first_page` out of guest
    /// memory. Called while the VM runs.
    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Starts tracking written pages.
    fn start_dirty_log(&mut self) -> io::Result<()>;
    /// The pages written since the last call (or since
    /// `start_dirty_log`), and forgets them: 1 bit per page, bit `i % 64`
    /// of word `i / 64`. It must include pages written by the VMM itself
    /// (device emulation writing guest memory), not only by vCPUs: after
    /// `pause_and_save`, one more call must return every page written
    /// since the previous call, the quiesce included.
    fn fetch_dirty(&mut self) -> io::Result<Vec<u64>>;
    /// Stops tracking (after success or failure).
    fn stop_dirty_log(&mut self);
    /// Pauses the vCPUs, quiesces the devices, returns the state bytes.
    /// On error the VM must be left as it was (running), or paused such
    /// that `resume()` restores it: `resume()` is called after an error.
    fn pause_and_save(&mut self) -> io::Result<Vec<u8>>;
    /// Undoes `pause_and_save`: the VM runs on here.
    fn resume(&mut self);
    /// What may be handed over instead of copied when the destination is
    /// on this host (a unix socket): see [`Handover`]. Called before
    /// pre-copy; the descriptors go once the VM is paused.
    fn handover(&self) -> io::Result<Handover> {
        Ok(Handover::default())
    }
}

/// Descriptors a source hands to a destination on the same host.
#[derive(Debug, Default)]
pub struct Handover {
    /// Guest RAM's memfd and where each RAM range is mapped here: the
    /// destination maps the same pages at the same addresses, and no page
    /// is copied.
    pub memory: Option<(OwnedFd, Vec<u64>)>,
    /// Connections to vhost-user backends: (disk id, backend socket, the
    /// connection). A backend serves one frontend at a time, and the
    /// destination takes over this one.
    pub vhost_user: Vec<(String, String, OwnedFd)>,
}

#[derive(Debug, Clone)]
pub struct SendConfig {
    pub transport: TransportConfig,
    /// How long the VM may stay paused (the target, estimated at the
    /// measured bandwidth).
    pub downtime: Duration,
    /// The most dirty-page rounds after round 0.
    pub max_rounds: u32,
    /// Pre-copy time limit: past it, the next switch-over happens
    /// whatever the dirty set.
    pub precopy_timeout: Duration,
    /// Rounds without a new smallest dirty set before giving up
    /// converging (switching over).
    pub stall_rounds: u32,
    /// How long the destination may take to restore (Complete to
    /// Restored) and to start the VM (Commit to Resumed).
    pub restore_timeout: Duration,
    /// Page data per Pages message (bytes; at most half of the frame limit).
    pub batch_bytes: usize,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            transport: TransportConfig::default(),
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            precopy_timeout: Duration::from_secs(600),
            stall_rounds: 5,
            restore_timeout: Duration::from_secs(60),
            batch_bytes: 4 << 20,
        }
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The dirty set fits the downtime target.
    Converged,
    MaxRounds,
    Timeout,
    /// The dirty set stopped shrinking.
    NotConverging,
    /// Guest RAM was handed over (same host): nothing to copy.
    MemoryHandedOver,
}

/// One round: 0 is all RAM; the last is the one sent with the VM paused.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    pub round: u32,
    /// Pages considered (all RAM in round 0, else the dirty set).
    pub pages: u64,
    /// Of those, sent as data.
    pub data_pages: u64,
    /// Of those, sent as zero runs.
    pub zero_pages: u64,
    /// Bytes on the wire (frames, headers included).
    pub bytes: u64,
    pub time: Duration,
    /// `bytes / time`, bytes per second.
    pub bandwidth: f64,
    /// True for the last round, sent with the VM paused.
    pub paused: bool,
}

#[derive(Debug, Clone)]
pub struct MigrationReport {
    pub rounds: Vec<RoundStats>,
    pub switch_reason: SwitchReason,
    /// Everything sent, frames included.
    pub bytes_sent: u64,
    pub state_bytes: u64,
    pub total_time: Duration,
    /// Pause to Resumed received.
    pub downtime: Duration,
    /// What pre-copy expected for the last dirty set at the measured
    /// bandwidth (state and restore not included).
    pub estimated_downtime: Duration,
}

/// Where a migration is, for the API to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting = 0,
    Precopy = 1,
    Paused = 2,
    AwaitResumed = 3,
    Done = 4,
    Failed = 5,
}

/// Shared progress: the migrating thread updates it, anyone reads it, and
/// [`Progress::cancel`] asks the migration to stop (the VM runs on).
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    round: AtomicU32,
    bytes_sent: AtomicU64,
    ram_bytes: AtomicU64,
    dirty_pages: AtomicU64,
    cancel: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub phase: Phase,
    pub round: u32,
    pub bytes_sent: u64,
    pub ram_bytes: u64,
    /// The dirty set last fetched, in pages.
    pub dirty_pages: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: match self.phase.load(Ordering::Relaxed) {
                0 => Phase::Connecting,
                1 => Phase::Precopy,
                2 => Phase::Paused,
                3 => Phase::AwaitResumed,
                4 => Phase::Done,
                _ => Phase::Failed,
            },
            round: self.round.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            ram_bytes: self.ram_bytes.load(Ordering::Relaxed),
            dirty_pages: self.dirty_pages.load(Ordering::Relaxed),
        }
    }

    /// Asks the migration to stop before switch-over; the VM runs on.
    /// Once paused, the migration finishes or fails on its own.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
}

/// Connects to `dest` and migrates the VM behind `source`.
pub fn migrate<S: MigrationSource>(
    source: &mut S,
    dest: &Address,
    cfg: &SendConfig,
    progress: &Progress,
) -> Result<MigrationReport, MigrationError> {
    progress.set_phase(Phase::Connecting);
    let conn = match transport::connect(dest, &cfg.transport) {
        Ok(c) => c,
        Err(e) => {
            progress.set_phase(Phase::Failed);
            return Err(MigrationError::new(Stage::Connect, e));
        }
    };
    migrate_over(conn, source, cfg, progress)
}

/// Migrates over an established connection.
pub fn migrate_over<S: MigrationSource>(
    mut conn: Connection,
    source: &mut S,
    cfg: &SendConfig,
    progress: &Progress,
) -> Result<MigrationReport, MigrationError> {
    let mut s = Sender {
        conn: &mut conn,
        cfg,
        progress,
        start: Instant::now(),
        bytes: 0,
        dirty_log: false,
        paused: false,
        committed: false,
    };
    let result = s.run(source);
    let (dirty_log, paused, committed) = (s.dirty_log, s.paused, s.committed);
    match result {
        Ok(report) => {
            if dirty_log {
                source.stop_dirty_log();
            }
            progress.set_phase(Phase::Done);
            Ok(report)
        }
        Err(mut e) if committed => {
            // The destination may run the VM: never resume here.
            e.in_doubt = true;
            if dirty_log {
                source.stop_dirty_log();
            }
            progress.set_phase(Phase::Failed);
            conn.shutdown();
            Err(e)
        }
        Err(e) => {
            // Logging off first: the devices resume without it.
            if dirty_log {
                source.stop_dirty_log();
            }
            if paused {
                source.resume();
            }
            progress.set_phase(Phase::Failed);
            Err(fail_connection(&mut conn, e))
        }
    }
}

struct Sender<'a> {
    conn: &'a mut Connection,
    cfg: &'a SendConfig,
    progress: &'a Progress,
    start: Instant,
    bytes: u64,
    dirty_log: bool,
    paused: bool,
    /// Commit may have reached the destination.
    committed: bool,
}

/// Frame overhead: header and CRC.
const FRAME_OVERHEAD: u64 = 9;
/// Zero runs per ZeroPages message before it is flushed.
const MAX_ZERO_RUNS: usize = 1 << 16;

impl Sender<'_> {
    fn send(&mut self, stage: Stage, msg: &Message) -> Result<(), MigrationError> {
        let (t, p) = protocol::encode(msg);
        self.send_parts(stage, t, &[&p])
    }

    fn send_parts(&mut self, stage: Stage, t: u8, parts: &[&[u8]]) -> Result<(), MigrationError> {
        self.conn
            .send_frame_parts(t, parts)
            .map_err(|e| MigrationError::new(stage, e))?;
        let n = parts.iter().map(|p| p.len() as u64).sum::<u64>() + FRAME_OVERHEAD;
        self.bytes += n;
        self.progress.bytes_sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&mut self, stage: Stage) -> Result<Message, MigrationError> {
        recv_at(self.conn, stage)
    }

    fn check_cancel(&self, stage: Stage) -> Result<(), MigrationError> {
        if !self.paused && self.progress.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::new(stage, ErrorKind::Cancelled));
        }
        Ok(())
    }

    fn run<S: MigrationSource>(
        &mut self,
        source: &mut S,
    ) -> Result<MigrationReport, MigrationError> {
        let machine = source.machine();
        if !machine.ram_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MigrationError::new(
                Stage::Hello,
                ErrorKind::Invalid(format!(
                    "RAM size {} is not a whole number of pages",
                    machine.ram_size
                )),
            ));
        }
        let ram_pages = machine.ram_size / PAGE_SIZE as u64;
        self.progress
            .ram_bytes
            .store(machine.ram_size, Ordering::Relaxed);
        self.progress.set_phase(Phase::Precopy);

        // Hello.
        self.send(
            Stage::Hello,
            &Message::Hello(protocol::Hello {
                format_version: FORMAT_VERSION,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                machine,
            }),
        )?;
        match self.recv(Stage::Hello)? {
            Message::Accept => {}
            Message::Refuse { reason } => {
                return Err(MigrationError::new(
                    Stage::Hello,
                    ErrorKind::Refused(reason),
                ))
            }
            m => return Err(unwanted(Stage::Hello, m, "Accept")),
        }

        let handover = if self.conn.carries_fds() {
            source
                .handover()
                .map_err(|e| MigrationError::new(Stage::Hello, ErrorKind::Vm(e)))?
        } else {
            Handover::default()
        };
        if handover.memory.is_some() {
            return self.hand_over(source, handover);
        }

        // Round 0: all RAM.
        source
            .start_dirty_log()
            .map_err(|e| MigrationError::new(Stage::Memory { round: 0 }, ErrorKind::Vm(e)))?;
        self.dirty_log = true;
        let mut rounds = Vec::new();
        let all = Bitmap::all(ram_pages);
        rounds.push(self.send_round(source, 0, &all, ram_pages, false)?);
        let mut bandwidth = rounds[0].bandwidth;

        // Rounds of dirty pages.
        let mut best = u64::MAX;
        let mut stalled = 0;
        let mut round = 0u32;
        let (pending, reason, estimate) = loop {
            let stage = Stage::Memory { round: round + 1 };
            self.check_cancel(stage)?;
            let dirty = source
                .fetch_dirty()
                .map_err(|e| MigrationError::new(stage, ErrorKind::Vm(e)))?;
            let dirty = Bitmap::from_words(dirty, ram_pages);
            let count = dirty.count();
            self.progress.dirty_pages.store(count, Ordering::Relaxed);
            let estimate = transfer_time(count, bandwidth);
            if count < best {
                best = count;
                stalled = 0;
            } else {
                stalled += 1;
            }
            let reason = if estimate <= self.cfg.downtime {
                Some(SwitchReason::Converged)
            } else if round >= self.cfg.max_rounds {
                Some(SwitchReason::MaxRounds)
            } else if self.start.elapsed() >= self.cfg.precopy_timeout {
                Some(SwitchReason::Timeout)
            } else if stalled >= self.cfg.stall_rounds {
                Some(SwitchReason::NotConverging)
            } else {
                None
            };
            if let Some(reason) = reason {
                break (dirty, reason, estimate);
            }
            round += 1;
            self.send(stage, &Message::Round { n: round })?;
            let stats = self.send_round(source, round, &dirty, ram_pages, false)?;
            // A round of under 1 MiB measures latency more than bandwidth.
            if stats.bytes >= 1 << 20 {
                bandwidth = stats.bandwidth;
            }
            rounds.push(stats);
        };

        // Switch-over.
        let (state, paused_at) = self.pause(source)?;
        let mut last = source
            .fetch_dirty()
            .map(|w| Bitmap::from_words(w, ram_pages))
            .map_err(|e| MigrationError::new(Stage::FinalMemory, ErrorKind::Vm(e)))?;
        last.or(&pending);
        round += 1;
        self.send(Stage::FinalMemory, &Message::Round { n: round })?;
        rounds.push(self.send_round(source, round, &last, ram_pages, true)?);

        self.send_handover(handover)?;
        self.send_state(&state)?;
        self.switch_over(rounds, reason, estimate, state.len(), paused_at)
    }

    /// Same host, guest RAM handed over: pause, hand the descriptors over,
    /// send the state; no page is copied.
    fn hand_over<S: MigrationSource>(
        &mut self,
        source: &mut S,
        handover: Handover,
    ) -> Result<MigrationReport, MigrationError> {
        let (state, paused_at) = self.pause(source)?;
        self.send_handover(handover)?;
        self.send_state(&state)?;
        self.switch_over(
            Vec::new(),
            SwitchReason::MemoryHandedOver,
            Duration::ZERO,
            state.len(),
            paused_at,
        )
    }

    /// Pauses the VM and saves its state: the state, and when it paused.
    fn pause<S: MigrationSource>(
        &mut self,
        source: &mut S,
    ) -> Result<(Vec<u8>, Instant), MigrationError> {
        self.check_cancel(Stage::Pause)?;
        self.progress.set_phase(Phase::Paused);
        self.paused = true;
        let paused_at = Instant::now();
        let state = source
            .pause_and_save()
            .map_err(|e| MigrationError::new(Stage::Pause, ErrorKind::Vm(e)))?;
        Ok((state, paused_at))
    }

    /// Sends the descriptors of `handover`, if any (the VM is paused).
    fn send_handover(&mut self, handover: Handover) -> Result<(), MigrationError> {
        let mut items = Vec::new();
        let mut fds = Vec::new();
        if let Some((m, host_addrs)) = handover.memory {
            items.push(Handed::Memory { host_addrs });
            fds.push(m);
        }
        for (id, socket, fd) in handover.vhost_user {
            items.push(Handed::VhostUser { id, socket });
            fds.push(fd);
        }
        if items.is_empty() {
            return Ok(());
        }
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        protocol::send_handover(self.conn, &items, &raw)
            .map_err(|e| MigrationError::new(Stage::State, e))?;
        tracing::info!(
            "migration: handed over {}",
            items
                .iter()
                .map(|i| match i {
                    Handed::Memory { .. } => "guest RAM".to_string(),
                    Handed::VhostUser { id, .. } => format!("disk {id}'s vhost-user connection"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    /// The machine state in pieces (at least one, even when empty), then
    /// Complete.
    fn send_state(&mut self, state: &[u8]) -> Result<(), MigrationError> {
        let piece = protocol::MAX_PAGES_PER_MESSAGE * PAGE_SIZE;
        for i in 0..state.len().div_ceil(piece).max(1) {
            let chunk = &state[(i * piece).min(state.len())..((i + 1) * piece).min(state.len())];
            self.send_parts(Stage::State, ty::STATE, &[chunk])?;
        }
        self.send(Stage::State, &Message::Complete)
    }

    /// Restored, Commit, Resumed.
    fn switch_over(
        &mut self,
        rounds: Vec<RoundStats>,
        reason: SwitchReason,
        estimate: Duration,
        state_bytes: usize,
        paused_at: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        self.progress.set_phase(Phase::AwaitResumed);
        self.conn
            .set_io_timeout(self.cfg.restore_timeout)
            .map_err(|e| MigrationError::new(Stage::AwaitRestored, e))?;
        match self.recv(Stage::AwaitRestored)? {
            Message::Restored => {}
            m => return Err(unwanted(Stage::AwaitRestored, m, "Restored")),
        }
        // From here on the VM may run on the destination.
        self.committed = true;
        self.send(Stage::AwaitResumed, &Message::Commit)?;
        match self.recv(Stage::AwaitResumed)? {
            Message::Resumed => {}
            Message::Abort { reason } => {
                // The destination did not run it: resuming here is safe.
                self.committed = false;
                return Err(MigrationError::new(
                    Stage::AwaitResumed,
                    ErrorKind::Aborted(reason),
                ));
            }
            m => return Err(unwanted(Stage::AwaitResumed, m, "Resumed")),
        }
        Ok(MigrationReport {
            rounds,
            switch_reason: reason,
            bytes_sent: self.bytes,
            state_bytes: state_bytes as u64,
            total_time: self.start.elapsed(),
            downtime: paused_at.elapsed(),
            estimated_downtime: estimate,
        })
    }

    /// Sends the pages set in `pages`: zero pages as runs, the rest as
    /// data in batches.
    fn send_round<S: MigrationSource>(
        &mut self,
        source: &S,
        round: u32,
        pages: &Bitmap,
        ram_pages: u64,
        paused: bool,
    ) -> Result<RoundStats, MigrationError> {
        let stage = if paused {
            Stage::FinalMemory
        } else {
            Stage::Memory { round }
        };
        self.progress.round.store(round, Ordering::Relaxed);
        let started = Instant::now();
        let bytes_before = self.bytes;
        let batch_pages =
            (self.cfg.batch_bytes / PAGE_SIZE).clamp(1, protocol::MAX_PAGES_PER_MESSAGE);
        let mut scratch = vec![0u8; batch_pages * PAGE_SIZE];
        let mut out = PageBatch {
            runs: Vec::new(),
            data: Vec::with_capacity(batch_pages * PAGE_SIZE),
            zero_runs: Vec::new(),
        };
        let mut stats = RoundStats {
            round,
            pages: 0,
            data_pages: 0,
            zero_pages: 0,
            bytes: 0,
            time: Duration::ZERO,
            bandwidth: 0.0,
            paused,
        };
        for run in pages.runs(batch_pages as u32) {
            if !paused {
                self.check_cancel(stage)?;
            }
            let n = run.count as usize;
            let buf = &mut scratch[..n * PAGE_SIZE];
            source
                .read_pages(run.first_page, buf)
                .map_err(|e| MigrationError::new(stage, ErrorKind::Vm(e)))?;
            for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                let pfn = run.first_page + i as u64;
                stats.pages += 1;
                if is_zero(page) {
                    stats.zero_pages += 1;
                    push_page(&mut out.zero_runs, pfn);
                    if out.zero_runs.len() >= MAX_ZERO_RUNS {
                        self.flush_zero(stage, &mut out)?;
                    }
                } else {
                    stats.data_pages += 1;
                    push_page(&mut out.runs, pfn);
                    out.data.extend_from_slice(page);
                    if out.data.len() >= batch_pages * PAGE_SIZE {
                        self.flush_data(stage, &mut out)?;
                    }
                }
            }
        }
        debug_assert!(pages.runs(1).all(|r| r.first_page < ram_pages));
        self.flush_data(stage, &mut out)?;
        self.flush_zero(stage, &mut out)?;
        stats.bytes = self.bytes - bytes_before;
        stats.time = started.elapsed();
        stats.bandwidth = stats.bytes as f64 / stats.time.as_secs_f64().max(1e-6);
        Ok(stats)
    }

    fn flush_data(&mut self, stage: Stage, out: &mut PageBatch) -> Result<(), MigrationError> {
        if out.runs.is_empty() {
            return Ok(());
        }
        let mut table = Vec::with_capacity(protocol::runs_len(out.runs.len()));
        protocol::put_runs(&mut table, &out.runs);
        self.send_parts(stage, ty::PAGES, &[&table, &out.data])?;
        out.runs.clear();
        out.data.clear();
        Ok(())
    }

    fn flush_zero(&mut self, stage: Stage, out: &mut PageBatch) -> Result<(), MigrationError> {
        if out.zero_runs.is_empty() {
            return Ok(());
        }
        let mut table = Vec::with_capacity(protocol::runs_len(out.zero_runs.len()));
        protocol::put_runs(&mut table, &out.zero_runs);
        self.send_parts(stage, ty::ZERO_PAGES, &[&table])?;
        out.zero_runs.clear();
        Ok(())
    }
}

struct PageBatch {
    runs: Vec<Run>,
    data: Vec<u8>,
    zero_runs: Vec<Run>,
}

/// Appends a page to a run list, extending the last run when adjacent.
fn push_page(runs: &mut Vec<Run>, pfn: u64) {
    if let Some(last) = runs.last_mut() {
        if last.first_page + u64::from(last.count) == pfn && last.count < u32::MAX {
            last.count += 1;
            return;
        }
    }
    runs.push(Run {
        first_page: pfn,
        count: 1,
    });
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

fn transfer_time(pages: u64, bandwidth: f64) -> Duration {
    if pages == 0 {
        return Duration::ZERO;
    }
    if bandwidth <= 0.0 || !bandwidth.is_finite() {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64((pages * PAGE_SIZE as u64) as f64 / bandwidth)
        .unwrap_or(Duration::MAX)
}

/// A page bitmap over `pages` pages; bits past the end are ignored.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    pages: u64,
}

impl Bitmap {
    fn all(pages: u64) -> Self {
        let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        Bitmap { words, pages }
    }

    fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        words.resize(n, 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Bitmap { words, pages }
    }

    fn or(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of set bits, each at most `max` pages long.
    fn runs(&self, max: u32) -> impl Iterator<Item = Run> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            // Skip clear bits, a word at a time when it is all clear.
            while page < self.pages {
                let w = self.words[(page / 64) as usize] >> (page % 64);
                if w == 0 {
                    page = (page / 64 + 1) * 64;
                } else {
                    page += u64::from(w.trailing_zeros());
                    break;
                }
            }
            if page >= self.pages {
                return None;
            }
            let first = page;
            while page < self.pages
                && page - first < u64::from(max)
                && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
            {
                page += 1;
            }
            Some(Run {
                first_page: first,
                count: (page - first) as u32,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_split_and_skip() {
        let mut words = vec![0u64; 3];
        words[0] = 0b1110_0001;
        words[1] = 1 << 63;
        words[2] = 0b11 | (1 << 40); // page 168 is past the end
        let b = Bitmap::from_words(words, 150);
        let runs: Vec<_> = b.runs(2).map(|r| (r.first_page, r.count)).collect();
        assert_eq!(runs, vec![(0, 1), (5, 2), (7, 1), (127, 2), (129, 1)]);
        assert_eq!(b.count(), 7);
        let all = Bitmap::all(70);
        assert_eq!(all.count(), 70);
        assert_eq!(all.runs(100).count(), 1);
    }

    #[test]
    fn transfer_time_handles_no_bandwidth() {
        assert_eq!(transfer_time(0, 0.0), Duration::ZERO);
        assert_eq!(transfer_time(1, 0.0), Duration::MAX);
        assert_eq!(transfer_time(256, 1048576.0), Duration::from_secs(1));
    }
}
