//! The destination: one source, checked, its pages written into our
//! guest memory, then the state restored, and the VM started once the
//! source has committed.
//!
//! Nothing outside the target is touched: a source that vanishes, lies or
//! aborts before committing leaves an error (which stage, why) and a VM
//! that never ran.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use super::protocol::{self, Handed, Machine, Message, Run, FORMAT_VERSION, PAGE_SIZE};
use super::transport::{Connection, Listener};
use super::{fail_connection, recv_at, unwanted, ErrorKind, MigrationError, Stage};

/// What the destination VMM provides.
///
/// Its guest RAM must read as zero when the migration starts (freshly
/// mapped): pages the source reports as zero are only written when they
/// were written before in this migration. Page numbers count 4 KiB RAM
/// pages, as on the source ([`super::MigrationSource`]).
pub trait MigrationTarget {
    /// RAM size, vCPUs and devices of this VMM, to check the source's.
    fn machine(&self) -> Machine;
    /// Writes `data.len() / 4096` pages at `first_page`.
    fn write_pages(&mut self, first_page: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `count` pages at `first_page` read as zero.
    fn zero_pages(&mut self, first_page: u64, count: u64) -> io::Result<()>;
    /// Restores the machine from the state bytes, ready to run but not
    /// running (the source still may resume it there).
    fn restore(&mut self, state: &[u8]) -> io::Result<()>;
    /// Starts the restored VM: the source has committed and will not
    /// resume it. An error must mean the VM did not start (the source then
    /// resumes it).
    fn run(&mut self) -> io::Result<()>;
    /// Takes descriptors the source handed over (same host, see
    /// [`super::protocol::Handed`]), before `restore`. Guest RAM handed
    /// over replaces this target's; nothing may write it before `run`.
    fn adopt(&mut self, handed: Vec<(Handed, OwnedFd)>) -> io::Result<()> {
        drop(handed);
        Err(io::Error::other(
            "this destination cannot take handed-over descriptors",
        ))
    }
}

#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// How long to wait for the source to connect.
    pub accept_timeout: Duration,
    /// The largest machine state accepted.
    pub max_state: usize,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            accept_timeout: Duration::from_secs(600),
            max_state: 256 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReceiveReport {
    /// The source, as the transport names it.
    pub peer: String,
    pub source_version: String,
    /// The highest Round marker seen.
    pub rounds: u32,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub state_bytes: u64,
    pub total_time: Duration,
    /// The source heard Resumed (false: the VM runs here, the source
    /// committed, but sending Resumed failed; the source stays paused
    /// and reports the migration in doubt).
    pub source_told: bool,
}

/// Waits up to [`ReceiveConfig::accept_timeout`] for one source on
/// `listener` and receives the VM. A peer turned away by the transport
/// (wrong uid, secret or address) is logged and the wait goes on: a stray
/// connection cannot end an incoming migration.
pub fn receive<T: MigrationTarget>(
    listener: &Listener,
    target: &mut T,
    cfg: &ReceiveConfig,
) -> Result<ReceiveReport, MigrationError> {
    let deadline = Instant::now() + cfg.accept_timeout;
    let conn = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match listener.accept(left) {
            Ok(c) => break c,
            Err(e) if e.is_rejected_peer() && !left.is_zero() => {
                tracing::warn!("incoming migration: turned a peer away: {e}");
            }
            Err(e) => return Err(MigrationError::new(Stage::Accept, e)),
        }
    };
    receive_on(conn, target, cfg)
}

/// Receives the VM over an accepted connection.
pub fn receive_on<T: MigrationTarget>(
    mut conn: Connection,
    target: &mut T,
    cfg: &ReceiveConfig,
) -> Result<ReceiveReport, MigrationError> {
    let mut r = Receiver {
        conn: &mut conn,
        cfg,
        written: Vec::new(),
        ram_pages: 0,
        report: ReceiveReport {
            peer: String::new(),
            source_version: String::new(),
            rounds: 0,
            data_pages: 0,
            zero_pages: 0,
            state_bytes: 0,
            total_time: Duration::ZERO,
            source_told: false,
        },
    };
    let start = Instant::now();
    match r.run(target) {
        Ok(()) => {
            let mut report = r.report;
            report.total_time = start.elapsed();
            Ok(report)
        }
        Err(e) => Err(fail_connection(&mut conn, e)),
    }
}

struct Receiver<'a> {
    conn: &'a mut Connection,
    cfg: &'a ReceiveConfig,
    /// Pages written so far (a zero run over a page never written is a
    /// no-op: fresh RAM reads as zero).
    written: Vec<u64>,
    ram_pages: u64,
    report: ReceiveReport,
}

/// Why `theirs` cannot run here, if it cannot.
pub fn incompatibility(ours: &Machine, theirs: &Machine) -> Option<String> {
    if ours.ram_size != theirs.ram_size {
        return Some(format!(
            "RAM size differs: the source has {} bytes, this destination {}",
            theirs.ram_size, ours.ram_size
        ));
    }
    if ours.vcpus != theirs.vcpus {
        return Some(format!(
            "vCPU count differs: the source has {}, this destination {}",
            theirs.vcpus, ours.vcpus
        ));
    }
    if ours.devices != theirs.devices {
        let list = |m: &Machine| {
            m.devices
                .iter()
                .map(|d| format!("{} id={}", d.kind, d.id))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Some(format!(
            "devices differ: the source has [{}], this destination [{}] (same kinds, ids and order needed)",
            list(theirs),
            list(ours)
        ));
    }
    None
}

impl Receiver<'_> {
    fn recv(&mut self, stage: Stage) -> Result<Message, MigrationError> {
        recv_at(self.conn, stage)
    }

    fn run<T: MigrationTarget>(&mut self, target: &mut T) -> Result<(), MigrationError> {
        self.report.peer = self.conn.peer().to_owned();
        let hello = match self.recv(Stage::Hello)? {
            Message::Hello(h) => h,
            m => return Err(unwanted(Stage::Hello, m, "Hello")),
        };
        self.report.source_version = hello.vmm_version.clone();
        let ours = target.machine();
        let refusal = if hello.format_version != FORMAT_VERSION {
            Some(format!(
                "the source speaks migration format {}, this kiln-vmm {FORMAT_VERSION}",
                hello.format_version
            ))
        } else if !ours.ram_size.is_multiple_of(PAGE_SIZE as u64) {
            Some("this destination's RAM size is not a whole number of pages".into())
        } else {
            incompatibility(&ours, &hello.machine)
        };
        if let Some(reason) = refusal {
            let _ = protocol::send(
                self.conn,
                &Message::Refuse {
                    reason: reason.clone(),
                },
            );
            return Err(MigrationError::new(
                Stage::Hello,
                ErrorKind::Refused(reason),
            ));
        }
        protocol::send(self.conn, &Message::Accept)
            .map_err(|e| MigrationError::new(Stage::Hello, e))?;
        self.ram_pages = ours.ram_size / PAGE_SIZE as u64;
        self.written = vec![0; self.ram_pages.div_ceil(64) as usize];

        let mut round = 0;
        let mut state = Vec::new();
        let mut in_state = false;
        let mut handed_over = false;
        loop {
            let stage = if !in_state {
                Stage::Memory { round }
            } else {
                Stage::State
            };
            match self.recv(stage)? {
                Message::Pages { runs, data } if !in_state => {
                    self.pages(target, stage, &runs, &data)?
                }
                Message::ZeroPages { runs } if !in_state => self.zero(target, stage, &runs)?,
                Message::Handover(items) if !in_state && !handed_over => {
                    handed_over = true;
                    let fds = self.conn.take_fds();
                    if fds.len() != items.len() {
                        return Err(MigrationError::new(
                            stage,
                            ErrorKind::Invalid(format!(
                                "a handover of {} items came with {} descriptors",
                                items.len(),
                                fds.len()
                            )),
                        ));
                    }
                    target
                        .adopt(items.into_iter().zip(fds).collect())
                        .map_err(|e| MigrationError::new(stage, ErrorKind::Vm(e)))?;
                }
                Message::Round { n } if !in_state => {
                    if n != round + 1 {
                        return Err(MigrationError::new(
                            stage,
                            ErrorKind::Invalid(format!("round {n} follows round {round}")),
                        ));
                    }
                    round = n;
                    self.report.rounds = n;
                }
                Message::State(bytes) => {
                    if state.len() + bytes.len() > self.cfg.max_state {
                        return Err(MigrationError::new(
                            Stage::State,
                            ErrorKind::Invalid(format!(
                                "the state is larger than {} bytes",
                                self.cfg.max_state
                            )),
                        ));
                    }
                    in_state = true;
                    state.extend_from_slice(&bytes);
                }
                Message::Complete if in_state => break,
                m => {
                    let expected = if !in_state {
                        "Pages, ZeroPages, Round, Handover or State"
                    } else {
                        "State or Complete"
                    };
                    return Err(unwanted(stage, m, expected));
                }
            }
        }
        self.report.state_bytes = state.len() as u64;
        target
            .restore(&state)
            .map_err(|e| MigrationError::new(Stage::Restore, ErrorKind::Vm(e)))?;
        drop(state);
        protocol::send(self.conn, &Message::Restored)
            .map_err(|e| MigrationError::new(Stage::AwaitCommit, e))?;
        match self.recv(Stage::AwaitCommit)? {
            Message::Commit => {}
            m => return Err(unwanted(Stage::AwaitCommit, m, "Commit")),
        }
        target
            .run()
            .map_err(|e| MigrationError::new(Stage::Run, ErrorKind::Vm(e)))?;
        // The VM runs here now, whether or not the source hears it.
        match protocol::send(self.conn, &Message::Resumed) {
            Ok(()) => self.report.source_told = true,
            Err(e) => tracing::warn!(
                "incoming migration: the VM runs here, but the source was not told ({e}); it stays paused there"
            ),
        }
        Ok(())
    }

    fn check_runs(&self, stage: Stage, runs: &[Run]) -> Result<(), MigrationError> {
        for r in runs {
            if r.first_page + u64::from(r.count) > self.ram_pages {
                return Err(MigrationError::new(
                    stage,
                    ErrorKind::Invalid(format!(
                        "pages {}..{} are past the end of RAM ({} pages)",
                        r.first_page,
                        r.first_page + u64::from(r.count),
                        self.ram_pages
                    )),
                ));
            }
        }
        Ok(())
    }

    fn pages<T: MigrationTarget>(
        &mut self,
        target: &mut T,
        stage: Stage,
        runs: &[Run],
        data: &[u8],
    ) -> Result<(), MigrationError> {
        self.check_runs(stage, runs)?;
        let mut off = 0;
        for r in runs {
            let len = r.count as usize * PAGE_SIZE;
            target
                .write_pages(r.first_page, &data[off..off + len])
                .map_err(|e| MigrationError::new(stage, ErrorKind::Vm(e)))?;
            off += len;
            for p in r.first_page..r.first_page + u64::from(r.count) {
                self.written[(p / 64) as usize] |= 1 << (p % 64);
            }
            self.report.data_pages += u64::from(r.count);
        }
        Ok(())
    }

    fn zero<T: MigrationTarget>(
        &mut self,
        target: &mut T,
        stage: Stage,
        runs: &[Run],
    ) -> Result<(), MigrationError> {
        self.check_runs(stage, runs)?;
        for r in runs {
            self.report.zero_pages += u64::from(r.count);
            // Zero only the stretches written before: fresh RAM is zero,
            // and writing it would allocate it.
            let mut p = r.first_page;
            let end = r.first_page + u64::from(r.count);
            while p < end {
                if !is_set(&self.written, p) {
                    p += 1;
                    continue;
                }
                let first = p;
                while p < end && is_set(&self.written, p) {
                    self.written[(p / 64) as usize] &= !(1 << (p % 64));
                    p += 1;
                }
                target
                    .zero_pages(first, p - first)
                    .map_err(|e| MigrationError::new(stage, ErrorKind::Vm(e)))?;
            }
        }
        Ok(())
    }
}

fn is_set(bits: &[u64], p: u64) -> bool {
    bits[(p / 64) as usize] & (1 << (p % 64)) != 0
}
