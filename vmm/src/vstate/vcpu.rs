//! vCPUs: their boot state and the thread that runs each one.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_devices::{Bus, ExitSignal, VmExit};
use kvm_bindings::{
    kvm_regs, kvm_sregs, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::vcpu_state::{StateError, VcpuState};
use super::vm::Vm;
use crate::arch::{cpuid, msr, regs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set vCPU {index}'s {what}: {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up long mode: {0}")]
    LongMode(#[from] regs::Error),
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot save the vCPUs: the VM is not paused")]
    NotPaused,
    #[error("cannot save the vCPUs: {stopped} of {threads} vCPU threads have stopped for good")]
    Stopped { stopped: usize, threads: usize },
    #[error(
        "cannot save the vCPUs: only {saved} of {threads} saved their state within {timeout:?}"
    )]
    SaveTimeout {
        saved: usize,
        threads: usize,
        timeout: Duration,
    },
    #[error("cannot save the vCPUs: {0}")]
    Save(#[from] StateError),
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

pub struct Vcpu {
    pub(super) index: u8,
    pub(super) fd: VcpuFd,
    /// The MSRs a snapshot saves (see [`super::vcpu_state::msrs_to_save`]).
    pub(super) msr_list: Arc<[u32]>,
    /// The size of the XSAVE area KVM_GET_XSAVE2 fills (4096 without it).
    pub(super) xsave_size: usize,
}

/// What the vCPU threads share: the buses and where to report an exit.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    /// Runs first on each vCPU thread (installs its seccomp filter).
    pub on_start: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// Where a vCPU waits while the VM is paused.
    pub pause: Arc<PauseGate>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does
/// nothing: KVM_RUN returning EINTR is the point).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// Installs the kick signal's handler, once per process, before any vCPU
/// thread runs (without one the signal would kill the process).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask;
    // the handler is async-signal-safe (it does nothing).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Default)]
struct PauseState {
    /// The VM should be paused.
    paused: bool,
    /// vCPU threads waiting in the gate.
    parked: usize,
    /// vCPU threads that will never enter the guest again.
    finished: usize,
    /// How many vCPU threads the last [`PauseGate::pause`] waited for.
    threads: usize,
    /// Bumped by each [`PauseGate::save_states`]: a parked vCPU thread that
    /// sees a new round saves its state once and hands it in.
    save_round: u64,
    /// What the vCPU threads handed in for the current round.
    saved: Vec<Result<VcpuState, StateError>>,
}

/// Pauses and resumes the vCPUs: each checks the gate before every
/// KVM_RUN and waits there while the VM is paused; [`PauseGate::pause`]
/// kicks them out of the guest until all are waiting.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<PauseState>,
    changed: Condvar,
}

/// How long [`PauseGate::pause`] waits for every vCPU to stop.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A gate that is paused from the start, for `threads` vCPU threads:
    /// they park before their first KVM_RUN (a restored VM that must not
    /// run until `resume`, or whose state is to be checked first).
    pub fn new_paused(threads: usize) -> Self {
        Self {
            state: Mutex::new(PauseState {
                paused: true,
                threads,
                ..Default::default()
            }),
            changed: Condvar::new(),
        }
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// On a vCPU thread: waits here while the VM is paused, and runs
    /// `save` (on this thread, as KVM wants for vCPU ioctls) each time
    /// [`PauseGate::save_states`] asks for the vCPUs' state.
    fn wait_while_paused(&self, save: &mut dyn FnMut() -> Result<VcpuState, StateError>) {
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        let mut round = s.save_round;
        self.changed.notify_all();
        while s.paused {
            if s.save_round != round {
                round = s.save_round;
                drop(s);
                let state = save();
                s = self.lock();
                // A round that timed out has been left: its late answers
                // go nowhere.
                if s.save_round == round {
                    s.saved.push(state);
                    self.changed.notify_all();
                }
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }

    /// On a vCPU thread that stops for good.
    fn finished(&self) {
        self.lock().finished += 1;
        self.changed.notify_all();
    }

    /// Pauses the VM: returns once all `threads` vCPU threads wait in the
    /// gate (or have finished). `kick` interrupts them in the guest; it is
    /// repeated until they are all out, since a kick that lands just before
    /// a KVM_RUN is lost. Gives up (and lets the vCPUs run on) after
    /// `timeout`.
    pub fn pause(&self, threads: usize, timeout: Duration, kick: impl Fn()) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        s.paused = true;
        s.threads = threads;
        loop {
            if s.parked + s.finished >= threads {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                s.paused = false;
                self.changed.notify_all();
                return Err(format!(
                    "only {} of {threads} vCPUs stopped within {timeout:?}",
                    s.parked + s.finished
                ));
            }
            drop(s);
            kick();
            s = self.lock();
            let wait = (deadline - now).min(Duration::from_millis(5));
            s = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// With the VM paused, has every vCPU thread save its state (on its own
    /// thread: it first lets KVM finish an I/O instruction it stopped in,
    /// then reads regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs,
    /// CPUID, TSC frequency, MP state and events), and returns the states
    /// in vCPU index order. The VM stays paused. Fails if the VM is not
    /// paused, if a vCPU thread has stopped for good (the VM is ending),
    /// if a vCPU's state cannot be read, or if they are not all saved
    /// within `timeout` (a save takes well under a millisecond).
    pub fn save_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, Error> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if !s.paused {
            return Err(Error::NotPaused);
        }
        if s.finished > 0 {
            return Err(Error::Stopped {
                stopped: s.finished,
                threads: s.threads,
            });
        }
        // A gate made paused (`new_paused`) may still wait for its threads.
        while s.parked < s.threads {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::SaveTimeout {
                    saved: 0,
                    threads: s.threads,
                    timeout,
                });
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.save_round += 1;
        s.saved.clear();
        self.changed.notify_all();
        while s.saved.len() < s.threads {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::SaveTimeout {
                    saved: s.saved.len(),
                    threads: s.threads,
                    timeout,
                });
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut states = std::mem::take(&mut s.saved)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|v| v.index);
        Ok(states)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, Error> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| Error::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            msr_list: vm.msr_list.clone(),
            xsave_size: vm.xsave_size,
        })
    }

    fn configure_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
        move |source| Error::Configure {
            index: self.index,
            what,
            source,
        }
    }

    /// CPUID, MSRs and local-APIC wiring for every vCPU.
    pub fn configure(&self, supported: &CpuId, count: u8) -> Result<(), Error> {
        let mut cpuid = supported.clone();
        cpuid::customize(&mut cpuid, self.index, count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.configure_err("CPUID"))?;
        self.fd
            .set_msrs(&msr::boot_msrs())
            .map_err(self.configure_err("MSRs"))?;

        // LINT0 receives the legacy PIC's interrupts, LINT1 is the NMI line.
        let mut lapic = self.fd.get_lapic().map_err(self.configure_err("LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as i8;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.configure_err("LAPIC"))
    }

    /// Puts the boot vCPU in 64-bit mode at `entry`. The others wait for
    /// the kernel's INIT/SIPI, as on real hardware.
    pub fn configure_boot(&self, mem: &GuestMemoryMmap, entry: GuestAddress) -> Result<(), Error> {
        let mut sregs = self.fd.get_sregs().map_err(self.configure_err("sregs"))?;
        regs::setup_long_mode(mem, &mut sregs)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.configure_err("sregs"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.configure_err("registers"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.configure_err("FPU"))
    }

    /// Runs the vCPU on its own thread until the VM stops.
    pub fn start(self, ctx: VcpuContext) -> Result<JoinHandle<()>, Error> {
        std::thread::Builder::new()
            .name(format!("kiln-vcpu{}", self.index))
            .stack_size(kiln_devices::THREAD_STACK_SIZE)
            .spawn(move || self.run(ctx))
            .map_err(Error::Spawn)
    }

    fn run(mut self, ctx: VcpuContext) {
        let exit = match (ctx.on_start)() {
            Err(e) => VmExit::Error(format!("vCPU {}: {e}", self.index)),
            Ok(()) => loop {
                ctx.pause
                    .wait_while_paused(&mut || self.save_state_paused(&ctx));
                match self.run_once(&ctx) {
                    // A device (the ACPI sleep or reset register, the
                    // i8042) may have just ended the VM: stop here rather
                    // than run the guest on while the VMM winds down. (A
                    // Linux guest polls the sleep status register after
                    // its power-off write: 180 exits in one boot.)
                    Ok(Step::Interrupted | Step::Handled) if ctx.exit.has_ended() => {
                        break ctx.exit.reason().unwrap_or(VmExit::PowerOff)
                    }
                    Ok(Step::Interrupted | Step::Handled) => continue,
                    Ok(Step::Exit(exit)) => break exit,
                    Err(msg) => break VmExit::Error(format!("vCPU {}: {msg}", self.index)),
                }
            },
        };
        ctx.exit.signal(exit);
        ctx.pause.finished();
        // The main thread ends the process; this thread neither runs the
        // guest again nor tears itself down (which its filter forbids).
        loop {
            std::thread::park();
        }
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self, ctx: &VcpuContext) -> Result<Step, String> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            // A triple fault: what a PC does then is reset. Say so, with
            // where the guest was: an unexpected one is a guest crash.
            Ok(VcpuExit::Shutdown) => {
                let regs = self.fd.get_regs().ok();
                let sregs = self.fd.get_sregs().ok();
                tracing::warn!(
                    "vCPU {}: triple fault ({}); resetting",
                    self.index,
                    triple_fault_site(regs.as_ref(), sregs.as_ref())
                );
                return Ok(Step::Exit(VmExit::Reset));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Step::Exit(VmExit::PowerOff)),
                    KVM_SYSTEM_EVENT_RESET => {
                        tracing::info!("vCPU {}: KVM system event: reset", self.index);
                        Ok(Step::Exit(VmExit::Reset))
                    }
                    KVM_SYSTEM_EVENT_CRASH => Err("the guest crashed".into()),
                    other => Err(format!("unexpected system event {other}")),
                }
            }
            // With an in-kernel LAPIC, HLT only exits when the guest halts
            // with interrupts off: it can never wake up again.
            Ok(VcpuExit::Hlt) => return Ok(Step::Exit(VmExit::PowerOff)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                return Err("KVM internal error (emulation failure)".into())
            }
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Step::Interrupted)
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
        Ok(Step::Handled)
    }
}

/// What one KVM_RUN came to.
enum Step {
    /// KVM_RUN returned without an exit (a kick, or `immediate_exit`).
    Interrupted,
    /// An exit the devices handled; the guest goes on.
    Handled,
    /// The VM ends.
    Exit(VmExit),
}

/// The most exits that finishing one instruction's I/O may take (a
/// string I/O instruction exits once per iteration KVM cannot batch).
const MAX_COMPLETION_EXITS: usize = 1024;

impl Vcpu {
    /// On the vCPU thread, paused: lets KVM finish the instruction whose
    /// I/O the devices answered last (`immediate_exit` + KVM_RUN, which
    /// returns EINTR without entering the guest; a string I/O instruction
    /// may exit again first, and that exit goes to the devices as usual),
    /// then reads the state.
    fn save_state_paused(&mut self, ctx: &VcpuContext) -> Result<VcpuState, StateError> {
        self.fd.set_kvm_immediate_exit(1);
        let mut done = Err("it kept exiting".to_string());
        for _ in 0..MAX_COMPLETION_EXITS {
            match self.run_once(ctx) {
                Ok(Step::Interrupted) => {
                    done = Ok(());
                    break;
                }
                Ok(Step::Handled) => continue,
                Ok(Step::Exit(exit)) => {
                    done = Err(format!("the VM ended ({exit:?})"));
                    break;
                }
                Err(msg) => {
                    done = Err(msg);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        done.map_err(|detail| StateError::Malformed {
            index: self.index,
            what: "pending I/O completion",
            detail,
        })?;
        self.read_state()
    }
}

/// Where the guest was when it triple-faulted, for the log. On AMD hosts KVM
/// puts the vCPU through INIT before it reports the shutdown, so the
/// registers then hold the reset state, not the fault's: say that instead
/// of pointing at the reset vector.
fn triple_fault_site(regs: Option<&kvm_regs>, sregs: Option<&kvm_sregs>) -> String {
    match (regs, sregs) {
        (Some(r), Some(s)) if r.rip == 0xfff0 && s.cs.base == 0xffff_0000 => {
            "where is unknown: KVM reset the vCPU before reporting it, as it does on AMD hosts"
                .to_string()
        }
        (Some(r), Some(s)) => format!(
            "rip={:#x} rsp={:#x} cr2={:#x} cr3={:#x}",
            r.rip, r.rsp, s.cr2, s.cr3
        ),
        _ => "where is unknown: KVM_GET_REGS or KVM_GET_SREGS failed".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let gate = Arc::new(PauseGate::default());
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (gate, runs) = (gate.clone(), runs.clone());
                std::thread::spawn(move || {
                    while runs.load(std::sync::atomic::Ordering::SeqCst) < 100_000 {
                        gate.wait_while_paused(&mut || unreachable!("no save asked"));
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::yield_now();
                    }
                    gate.finished();
                })
            })
            .collect();
        gate.pause(2, PAUSE_TIMEOUT, || {}).unwrap();
        assert!(gate.is_paused());
        let before = runs.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), before);
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
        // Finished threads count as stopped; a missing one times out.
        gate.pause(2, PAUSE_TIMEOUT, || {}).unwrap();
        gate.resume();
        let e = gate.pause(3, Duration::from_millis(20), || {}).unwrap_err();
        assert!(e.contains("2 of 3"), "{e}");
        assert!(!gate.is_paused());
    }

    #[test]
    fn a_triple_fault_is_located_only_when_kvm_kept_the_registers() {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_1234,
            rsp: 0xffff_c900_0000_3f00,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr2: 0x10,
            cr3: 0x1a0_c000,
            ..Default::default()
        };
        assert_eq!(
            triple_fault_site(Some(&regs), Some(&sregs)),
            "rip=0xffffffff81001234 rsp=0xffffc90000003f00 cr2=0x10 cr3=0x1a0c000"
        );
        // The INIT state KVM leaves behind on AMD.
        regs.rip = 0xfff0;
        sregs.cs.base = 0xffff_0000;
        assert!(triple_fault_site(Some(&regs), Some(&sregs)).contains("AMD"));
        assert!(triple_fault_site(None, Some(&sregs)).contains("failed"));
    }
}
