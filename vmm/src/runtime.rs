//! Running a built machine: vCPU threads, and the main thread's event loop
//! (console input, VM exit) on event-manager's epoll.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kiln_devices::legacy::SerialDevice;
use kiln_devices::{ExitSignal, VmExit};
use vmm_sys_util::epoll::EventSet;

use crate::builder::Machine;
use crate::terminal::RawTerminal;
use crate::vstate::vcpu::VcpuContext;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("event loop: {0}")]
    EventManager(#[from] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::Error),
    #[error("cannot install the main thread's seccomp filter: {0}")]
    Seccomp(String),
}

/// A per-thread-kind hook run before the thread touches the guest.
pub type ThreadHook = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Hooks that confine each kind of thread (see `seccomp`).
#[derive(Clone)]
pub struct Confinement {
    pub main: ThreadHook,
    pub vcpu: ThreadHook,
    pub io: ThreadHook,
    pub vhost_user: ThreadHook,
}

impl Confinement {
    pub fn none() -> Self {
        let nothing: ThreadHook = Arc::new(|| Ok(()));
        Self {
            main: nothing.clone(),
            vcpu: nothing.clone(),
            io: nothing.clone(),
            vhost_user: nothing,
        }
    }
}

/// Forwards stdin to the serial port, pausing while its FIFO is full.
struct ConsoleInput {
    stdin: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    ready_fd: RawFd,
    reading: bool,
}

impl ConsoleInput {
    fn stdin_events(&self) -> Events {
        Events::new_raw(self.stdin, EventSet::IN)
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_room();
        if room == 0 {
            // Resume when the guest has read the FIFO empty.
            let _ = ops.remove(self.stdin_events());
            self.reading = false;
            return;
        }
        let mut buf = [0u8; 64];
        let n = room.min(buf.len());
        match std::io::stdin().lock().read(&mut buf[..n]) {
            Ok(0) => {
                // End of input: nothing more to forward.
                let _ = ops.remove(self.stdin_events());
                self.reading = false;
            }
            Ok(k) => {
                serial.push_input(&buf[..k]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("console input stopped: {e}");
                let _ = ops.remove(self.stdin_events());
                self.reading = false;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null cannot be polled: no console input then.
        self.reading = ops.add(self.stdin_events()).is_ok();
        if let Err(e) = ops.add(Events::new_raw(self.ready_fd, EventSet::IN)) {
            tracing::warn!("console input: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.stdin {
            self.pump(ops);
        } else if events.fd() == self.ready_fd {
            let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let _ = serial.input_ready_eventfd().read();
            drop(serial);
            if !self.reading {
                self.reading = ops.add(self.stdin_events()).is_ok();
            }
        }
    }
}

/// Ends the event loop when the VM stops.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(self.exit.eventfd(), EventSet::IN))
            .expect("a fresh epoll accepts the exit eventfd");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
        if self.exit.reason().is_some() {
            self.done.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs the machine until the guest powers off, resets or fails.
pub fn run(machine: Machine, console_input: bool, confine: Confinement) -> Result<VmExit, Error> {
    let terminal = if console_input {
        RawTerminal::enter(libc::STDIN_FILENO)
    } else {
        None
    };
    let result = run_inner(machine, console_input, confine);
    if let Some(t) = terminal {
        t.restore();
    }
    result
}

fn run_inner(machine: Machine, console_input: bool, confine: Confinement) -> Result<VmExit, Error> {
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()?;
    let done = Arc::new(AtomicBool::new(false));
    em.add_subscriber(Box::new(ExitWatcher {
        exit: machine.exit.clone(),
        done: done.clone(),
    }));
    if console_input {
        let ready_fd = machine
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_ready_eventfd()
            .as_raw_fd();
        em.add_subscriber(Box::new(ConsoleInput {
            stdin: libc::STDIN_FILENO,
            serial: machine.serial.clone(),
            ready_fd,
            reading: false,
        }));
    }

    let ctx = VcpuContext {
        pio: machine.pio.clone(),
        mmio: machine.mmio.clone(),
        exit: machine.exit.clone(),
        on_start: confine.vcpu.clone(),
    };
    let mut threads = Vec::new();
    for vcpu in machine.vcpus {
        threads.push(vcpu.start(ctx.clone())?);
    }
    (confine.main)().map_err(Error::Seccomp)?;

    while !done.load(Ordering::SeqCst) {
        em.run()?;
    }
    // The vCPU threads are left running in the guest: the caller ends the
    // process (or re-executes it) next, which stops them.
    Ok(machine
        .exit
        .reason()
        .unwrap_or_else(|| VmExit::Error("the VM stopped without a reason".into())))
}
