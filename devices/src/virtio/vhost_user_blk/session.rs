//! One activation of a vhost-user-blk device, run on the device's worker
//! thread: hand the negotiated features, guest memory and rings to the
//! backend, watch its socket until the device is reset, then take the rings
//! back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::handshake::{
    self, BackendRequests, ConfigChanged, Error as HandshakeError, SharedConfig,
};
use super::log_base;
use crate::dirty::BackendLog;
use crate::virtio::interrupt::Interrupt;
use crate::virtio::worker::{EventSetPoller, TOKEN_STOP};

/// The epoll token of the backend's socket.
const TOKEN_BACKEND: u64 = 1;
/// The epoll token of the backend's request channel.
const TOKEN_REQUESTS: u64 = 2;

/// Why the backend could not take the rings.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("guest memory is not shareable (region at {0:#x} has no file): kiln-vmm must back it with a memfd for vhost-user")]
    MemoryNotShareable(u64),
    #[error("queue {queue}: {what} at {addr:#x} is outside guest memory")]
    RingOutsideMemory {
        queue: usize,
        what: &'static str,
        addr: u64,
    },
    #[error(transparent)]
    Backend(#[from] HandshakeError),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> StartError {
    move |source| HandshakeError::Protocol { step, source }.into()
}

/// Everything one activation needs, moved to the worker thread.
pub(super) struct Session {
    pub name: String,
    pub socket: PathBuf,
    pub frontend: Frontend,
    pub protocol_features: VhostUserProtocolFeatures,
    /// What SET_FEATURES acknowledges.
    pub features: u64,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub kicks: Vec<Arc<EventFd>>,
    pub interrupt: Arc<Interrupt>,
    pub poller: Arc<EventSetPoller>,
    /// The guest-visible config space, refreshed on a config change.
    pub config: SharedConfig,
    pub config_changed: Arc<ConfigChanged>,
    /// The device's queue count (`num_queues` in the config space).
    pub queue_count: u16,
    /// The backend's request channel, taken for the session and put back.
    pub requests: Arc<Mutex<Option<BackendRequests>>>,
    /// Set on a connection handed over by a migration, until its first
    /// activation: what was negotiated is learnt again, and the request
    /// channel (the source's went with it) given, before anything else.
    pub adopted: Arc<AtomicBool>,
    /// Where the queues go, with the positions the backend left them at,
    /// once it has stopped every ring (not if it went away).
    pub handback: QueueHandback,
    /// The frontend's socket, for the message sent by hand (`log_base`).
    pub socket_fd: std::os::fd::RawFd,
    /// The dirty log the backend is to write (a migration runs).
    pub log: Option<Arc<BackendLog>>,
}

/// Where a session leaves its queues when the backend stopped the rings.
pub(super) type QueueHandback = Arc<Mutex<Option<Vec<Queue>>>>;

impl Session {
    /// The worker's body: starts the rings, reports the outcome on `started`
    /// (the vCPU activating the device waits for it), then serves until the
    /// stop eventfd fires.
    pub fn run(mut self, started: SyncSender<Result<(), StartError>>) {
        let result = self.start();
        let ok = result.is_ok();
        if started.send(result).is_err() || !ok {
            return;
        }
        info!(device = %self.name, socket = %self.socket.display(), "vhost-user backend serves the queues");
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let connected = self.watch_until_stopped(&mut requests);
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) = requests;
        if connected && self.stop_rings() {
            let queues = std::mem::take(&mut self.queues);
            *self.handback.lock().unwrap_or_else(|e| e.into_inner()) = Some(queues);
        }
    }

    fn start(&mut self) -> Result<(), StartError> {
        if self.adopted.swap(false, Ordering::AcqRel) {
            // A connection handed over by a migration: the vhost crate's
            // frontend learns what was negotiated on it (it goes by what it
            // saw), replies being asked for only once REPLY_ACK is agreed
            // again, and the backend gets our request channel. (The backend
            // still knows the source's rings by their addresses in the
            // source's memory map, which guest RAM keeps here: see
            // `vstate::memory::map_memfd_shared_at`.)
            self.frontend.get_features().map_err(step("GET_FEATURES"))?;
            self.frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            self.frontend
                .set_protocol_features(self.protocol_features)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if self
                .protocol_features
                .contains(VhostUserProtocolFeatures::REPLY_ACK)
            {
                self.frontend
                    .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
            let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = requests.as_ref() {
                self.frontend
                    .set_backend_request_fd(&r.get_tx_raw_fd())
                    .map_err(step("SET_BACKEND_REQ_FD"))?;
            }
        }
        // While a migration runs the backend logs its writes (LOG_ALL).
        let features = match self.log {
            Some(_) => self.features | handshake::LOG_ALL,
            None => self.features,
        };
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        let regions = self
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| StartError::MemoryNotShareable(r.start_addr().0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        // After the memory table: a backend attaches the log to the
        // regions it has mapped (rust-vmm's vhost-user-backend does).
        if let Some(log) = &self.log {
            log_base::set_log_base(self.socket_fd, log)
                .map_err(|e| StartError::Backend(HandshakeError::LogBase(e)))?;
        }
        for (i, q) in self.queues.iter().enumerate() {
            let size = q.size();
            let host = |what: &'static str, addr: u64| {
                self.mem
                    .get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| StartError::RingOutsideMemory {
                        queue: i,
                        what,
                        addr,
                    })
            };
            // vhost-user ring addresses are in the frontend's address space;
            // the backend translates them through the memory table.
            // Logging: the used ring's writes are logged at its guest
            // address (libvhost-user goes by it; vhost-user-backend logs
            // every write it makes through guest memory anyway).
            let rings = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: size,
                flags: if self.log.is_some() {
                    VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
                } else {
                    0
                },
                desc_table_addr: host("descriptor table", q.desc_table())?,
                used_ring_addr: host("used ring", q.used_ring())?,
                avail_ring_addr: host("available ring", q.avail_ring())?,
                log_addr: self.log.as_ref().map(|_| q.used_ring()),
            };
            self.frontend
                .set_vring_num(i, size)
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_addr(i, &rings)
                .map_err(step("SET_VRING_ADDR"))?;
            // Used-ring interrupts go straight from the backend to KVM.
            self.frontend
                .set_vring_call(i, self.interrupt.irqfd())
                .map_err(step("SET_VRING_CALL"))?;
            // Guest notifications go straight from KVM to the backend.
            self.frontend
                .set_vring_kick(i, &self.kicks[i])
                .map_err(step("SET_VRING_KICK"))?;
            // With VHOST_USER_F_PROTOCOL_FEATURES acked, rings start disabled.
            self.frontend
                .set_vring_enable(i, true)
                .map_err(step("SET_VRING_ENABLE"))?;
        }
        debug!(
            device = %self.name,
            features = format_args!("{:#x}", self.features),
            protocol = format_args!("{:#x}", self.protocol_features.bits()),
            "vhost-user rings handed over"
        );
        Ok(())
    }

    /// Waits for the stop eventfd, logging (once) if the backend hangs up
    /// meanwhile, and serves the backend's requests (config changes).
    /// Returns whether the backend is still connected.
    fn watch_until_stopped(&mut self, requests: &mut Option<BackendRequests>) -> bool {
        let socket = self.frontend.clone();
        let socket = &socket;
        let mut connected = true;
        if let Err(e) = self.poller.add(socket, TOKEN_BACKEND) {
            warn!(device = %self.name, "cannot watch the vhost-user socket: {e}");
        }
        let mut watching_requests = false;
        if let Some(r) = requests.as_ref() {
            match self.poller.add(r, TOKEN_REQUESTS) {
                Ok(()) => watching_requests = true,
                Err(e) => {
                    warn!(device = %self.name, "cannot watch the backend's request channel: {e}")
                }
            }
        }
        let mut events = [EpollEvent::default(); 4];
        'wait: loop {
            let n = match self.poller.wait(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    error!(device = %self.name, "device worker epoll failed: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => break 'wait,
                    TOKEN_BACKEND => {
                        let hung_up = ev
                            .event_set()
                            .intersects(EventSet::HANG_UP | EventSet::ERROR);
                        if hung_up {
                            error!(
                                device = %self.name,
                                socket = %self.socket.display(),
                                "the vhost-user backend disconnected: the guest's I/O on this disk \
                                 will hang until the VM is restarted with a backend"
                            );
                            connected = false;
                        } else {
                            // Nothing is asked of it: the backend spoke out of turn.
                            warn!(
                                device = %self.name,
                                "unexpected message from the vhost-user backend; no longer watching it"
                            );
                        }
                        let _ = self.poller.remove(socket);
                    }
                    TOKEN_REQUESTS => {
                        if let Some(r) = requests.as_mut() {
                            if !self.serve_request(r) {
                                let _ = self.poller.remove(&*r);
                                watching_requests = false;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if connected {
            let _ = self.poller.remove(socket);
        }
        if watching_requests {
            if let Some(r) = requests.as_ref() {
                let _ = self.poller.remove(r);
            }
        }
        connected
    }

    /// Handles one message on the backend's request channel; on a config
    /// change, rereads the config space (GET_CONFIG) and raises the guest's
    /// config-change interrupt. Returns false when the channel is gone.
    fn serve_request(&mut self, requests: &mut BackendRequests) -> bool {
        if let Err(e) = requests.handle_request() {
            warn!(device = %self.name, "the backend's request channel failed, no longer watching it: {e}");
            return false;
        }
        if !self.config_changed.take() {
            return true;
        }
        match handshake::read_config(&mut self.frontend, self.queue_count) {
            Ok(config) => {
                let sectors = handshake::capacity_sectors(&config);
                *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
                info!(device = %self.name, sectors, "the backend's config changed; telling the guest");
                if let Err(e) = self.interrupt.signal_config_change() {
                    error!(device = %self.name, "cannot raise the config-change interrupt: {e}");
                }
            }
            Err(e) => warn!(device = %self.name, "cannot reread the backend's config: {e}"),
        }
        true
    }

    /// Device reset or quiesce: the backend stops processing the rings,
    /// completing the requests it took from them, and returns their state
    /// (GET_VRING_BASE: the next available index). The next used index is
    /// the used ring's, in guest memory. Returns whether every ring's state
    /// came back (the queues then hold it).
    fn stop_rings(&mut self) -> bool {
        let mut all = true;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if let Err(e) = self.frontend.set_vring_enable(i, false) {
                warn!(device = %self.name, "vhost-user SET_VRING_ENABLE {i} off failed: {e}");
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => {
                    debug!(device = %self.name, queue = i, base, "vhost-user ring stopped");
                    q.set_next_avail(base as u16);
                    match q.used_idx(&self.mem, Ordering::Acquire) {
                        Ok(used) => q.set_next_used(used.0),
                        Err(e) => {
                            warn!(device = %self.name, "cannot read the used index of queue {i}: {e}");
                            all = false;
                        }
                    }
                }
                Err(e) => {
                    warn!(device = %self.name, "vhost-user GET_VRING_BASE {i} failed: {e}");
                    all = false;
                }
            }
        }
        all
    }
}
