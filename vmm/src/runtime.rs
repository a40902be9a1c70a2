//! Running a built machine: vCPU threads, and the main thread's event loop
//! (console input, control API requests, VM exit) on event-manager's epoll.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kiln_devices::legacy::SerialDevice;
use kiln_devices::{ExitSignal, VmExit};
use vmm_sys_util::epoll::EventSet;

use crate::api::{self, ApiReceiver, ApiResponse};
use crate::builder::Machine;
use crate::console::ConsoleSocket;
use crate::control::{DeviceStats, VmControl};
use crate::terminal::RawTerminal;
use crate::vstate::vcpu::{self, PauseGate, VcpuContext};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("event loop: {0}")]
    EventManager(#[from] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::Error),
    #[error("cannot install the main thread's seccomp filter: {0}")]
    Seccomp(String),
    #[error("cannot set up the vCPU kick signal: {0}")]
    KickSignal(std::io::Error),
    #[error("control API: {0}")]
    Api(#[from] api::http::Error),
    #[error("control API: cannot create its channel: {0}")]
    ApiChannel(std::io::Error),
    #[error("cannot start the migration thread: {0}")]
    MigrationThread(std::io::Error),
    #[error(transparent)]
    Restored(#[from] crate::persist::Error),
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
    /// The control API's HTTP thread.
    pub api: ThreadHook,
    /// The thread that runs an outgoing live migration.
    pub migration: ThreadHook,
}

impl Confinement {
    pub fn none() -> Self {
        let nothing: ThreadHook = Arc::new(|| Ok(()));
        Self {
            main: nothing.clone(),
            vcpu: nothing.clone(),
            io: nothing.clone(),
            vhost_user: nothing.clone(),
            api: nothing.clone(),
            migration: nothing,
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

/// Runs the control API's actions as the event loop receives them.
struct ApiHandler {
    api: ApiReceiver,
    control: VmControl,
    /// For each action that ended the VM: fires once its response is out.
    written: Arc<Mutex<Vec<mpsc::Receiver<()>>>>,
}

impl MutEventSubscriber for ApiHandler {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.api.evt, EventSet::IN))
            .expect("a fresh epoll accepts the API eventfd");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.api.evt.read();
        while let Ok(req) = self.api.rx.try_recv() {
            let ends_vm = req.action.ends_vm();
            let result = self.control.handle(req.action);
            let mut written = None;
            if ends_vm && result.is_ok() {
                let (tx, rx) = mpsc::sync_channel(1);
                written = Some(tx);
                self.written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(rx);
            }
            let _ = req.reply.send(ApiResponse { result, written });
        }
    }
}

/// The control API of a run: where it listens and what `GET /vm` reports.
pub struct ApiSetup {
    pub listener: UnixListener,
    /// When the VMM started (`uptime_ms`).
    pub started: Instant,
    /// `GET /vm`'s `config`.
    pub config: serde_json::Value,
    /// Each device's counters.
    pub devices: Vec<DeviceStats>,
    /// The vCPUs wait, paused, for `PUT /vm/resume` (`--paused`).
    pub start_paused: bool,
}

/// Runs the machine until the guest powers off, resets or fails.
pub fn run(
    machine: Machine,
    console_input: bool,
    confine: Confinement,
    api: Option<ApiSetup>,
) -> Result<VmExit, Error> {
    start(machine, console_input, confine, api)?.wait()
}

/// A machine whose vCPUs run: [`Running::wait`] serves its event loop
/// until it stops.
pub struct Running {
    em: EventManager<Box<dyn MutEventSubscriber + Send>>,
    done: Arc<AtomicBool>,
    /// For each action that ended the VM: fires once its response is out.
    written: Arc<Mutex<Vec<mpsc::Receiver<()>>>>,
    main_hook: ThreadHook,
    terminal: Option<RawTerminal>,
    /// Guest memory, the VM and the devices stay alive with it.
    machine: Machine,
}

/// Starts the vCPUs and the control API of `machine`; the main thread's
/// seccomp filter is installed later, by [`Running::wait`], so that the
/// caller can still finish what the filter forbids (an incoming
/// migration's last message).
pub fn start(
    mut machine: Machine,
    console_input: bool,
    confine: Confinement,
    api: Option<ApiSetup>,
) -> Result<Running, Error> {
    let terminal = if console_input {
        RawTerminal::enter(libc::STDIN_FILENO)
    } else {
        None
    };
    let restore_terminal = |t: Option<RawTerminal>| {
        if let Some(t) = t {
            t.restore();
        }
    };
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = match EventManager::new() {
        Ok(em) => em,
        Err(e) => {
            restore_terminal(terminal);
            return Err(e.into());
        }
    };
    match start_inner(&mut em, &mut machine, console_input, &confine, api) {
        Ok((done, written)) => Ok(Running {
            em,
            done,
            written,
            main_hook: confine.main.clone(),
            terminal,
            machine,
        }),
        Err(e) => {
            restore_terminal(terminal);
            Err(e)
        }
    }
}

type Started = (Arc<AtomicBool>, Arc<Mutex<Vec<mpsc::Receiver<()>>>>);

fn start_inner(
    em: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    machine: &mut Machine,
    console_input: bool,
    confine: &Confinement,
    api: Option<ApiSetup>,
) -> Result<Started, Error> {
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

    if let Some((listener, hub)) = machine.console.take() {
        em.add_subscriber(Box::new(ConsoleSocket::new(
            listener,
            hub,
            machine.serial.clone(),
        )));
    }
    // A restored machine's devices start serving (they were restored
    // paused), and its guest hears that it was restored.
    if machine.restored {
        crate::persist::start_restored(&crate::persist::RestartParts {
            mem: &machine.mem,
            transports: &machine.transports,
            ged: &machine.ged,
            announcers: &machine.announcers,
            config: &machine.saved_config,
        })?;
    }
    vcpu::install_kick_handler().map_err(Error::KickSignal)?;
    // With --paused the vCPU threads park before their first KVM_RUN.
    let pause = Arc::new(match &api {
        Some(a) if a.start_paused => {
            tracing::info!("the VM is paused until PUT /vm/resume");
            PauseGate::new_paused(machine.vcpus.len())
        }
        _ => PauseGate::default(),
    });
    let ctx = VcpuContext {
        pio: machine.pio.clone(),
        mmio: machine.mmio.clone(),
        exit: machine.exit.clone(),
        on_start: confine.vcpu.clone(),
        pause: pause.clone(),
    };
    let mut threads = Vec::new();
    for vcpu in std::mem::take(&mut machine.vcpus) {
        threads.push(vcpu.start(ctx.clone())?);
    }

    let live = crate::persist::LiveMachine {
        mem: machine.mem.clone(),
        vm: machine.vm.clone(),
        pause: pause.clone(),
        vcpus: threads.iter().map(|t| t.as_pthread_t()).collect(),
        transports: machine.transports.clone(),
        serial: machine.serial.clone(),
        ged: machine.ged.clone(),
        config: machine.saved_config.clone(),
    };
    let written = Arc::new(Mutex::new(Vec::new()));
    if let Some(setup) = api {
        let migration =
            crate::migrate::MigrationWorker::spawn(confine.migration.clone(), machine.exit.clone())
                .map_err(Error::MigrationThread)?;
        let (sender, receiver) = api::channel().map_err(Error::ApiChannel)?;
        em.add_subscriber(Box::new(ApiHandler {
            api: receiver,
            control: VmControl {
                started: setup.started,
                config: setup.config,
                exit: machine.exit.clone(),
                ged: machine.ged.clone(),
                pause,
                vcpus: threads.iter().map(|t| t.as_pthread_t()).collect(),
                devices: setup.devices,
                live,
                migration,
            },
            written: written.clone(),
        }));
        api::http::spawn(
            setup.listener,
            sender,
            confine.api.clone(),
            machine.exit.clone(),
        )?;
    }
    Ok((done, written))
}

impl Running {
    /// Confines the calling (main) thread and serves the event loop until
    /// the guest powers off, resets or fails.
    pub fn wait(mut self) -> Result<VmExit, Error> {
        let result = self.serve();
        if let Some(t) = self.terminal.take() {
            t.restore();
        }
        result
    }

    fn serve(&mut self) -> Result<VmExit, Error> {
        (self.main_hook)().map_err(Error::Seccomp)?;
        while !self.done.load(Ordering::SeqCst) {
            self.em.run()?;
        }
        // An API client that ended the VM gets its response before we go.
        for w in self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = w.recv_timeout(api::WRITE_GRACE);
        }
        // The vCPU threads are left running in the guest: the caller ends
        // the process (or re-executes it) next, which stops them.
        Ok(self
            .machine
            .exit
            .reason()
            .unwrap_or_else(|| VmExit::Error("the VM stopped without a reason".into())))
    }
}
