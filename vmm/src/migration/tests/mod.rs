//! Migrations over real sockets between threads, with a small in-memory
//! "RAM" behind the traits.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::protocol::{self, DeviceId, Machine, Message, PAGE_SIZE};
use super::transport::{self, Connection, Listener, Secret, TransportConfig, TransportError};
use super::*;

const MIB: u64 = 1 << 20;

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kiln-migration-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machine(ram: u64) -> Machine {
    Machine {
        ram_size: ram,
        vcpus: 2,
        devices: vec![
            DeviceId {
                kind: "virtio-blk".into(),
                id: "root".into(),
            },
            DeviceId {
                kind: "virtio-net".into(),
                id: "eth0".into(),
            },
        ],
    }
}

struct RamInner {
    bytes: Vec<u8>,
    dirty: Vec<u64>,
    logging: bool,
    paused: bool,
}

/// Guest RAM shared by the fake source and a writer thread.
struct SharedRam(Mutex<RamInner>);

impl SharedRam {
    fn new(size: u64) -> Arc<Self> {
        let pages = size / PAGE_SIZE as u64;
        Arc::new(SharedRam(Mutex::new(RamInner {
            bytes: vec![0; size as usize],
            dirty: vec![0; pages.div_ceil(64) as usize],
            logging: false,
            paused: false,
        })))
    }

    /// Writes `value` all over page `p` (0 zeroes it), as a vCPU would.
    /// Returns false (and writes nothing) while paused.
    fn write_page(&self, p: u64, value: u8) -> bool {
        let mut g = self.0.lock().unwrap();
        if g.paused {
            return false;
        }
        let off = p as usize * PAGE_SIZE;
        g.bytes[off..off + PAGE_SIZE].fill(value);
        if g.logging {
            g.dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        true
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Calls {
    start_log: u32,
    stop_log: u32,
    pause: u32,
    resume: u32,
}

struct FakeSource {
    ram: Arc<SharedRam>,
    machine: Machine,
    state: Vec<u8>,
    calls: Calls,
    /// RAM as it was at pause.
    at_pause: Option<Vec<u8>>,
    /// Pages 0..churn rewritten before each fetch of the dirty log (a
    /// guest that never lets the dirty set shrink).
    churn: u64,
    /// pause_and_save pauses, then fails.
    fail_pause: bool,
}

impl FakeSource {
    fn new(ram: Arc<SharedRam>, size: u64) -> Self {
        FakeSource {
            ram,
            machine: machine(size),
            state: (0..100_000u32).map(|i| (i % 251) as u8).collect(),
            calls: Calls::default(),
            at_pause: None,
            churn: 0,
            fail_pause: false,
        }
    }
    /// Paused now and never resumed, or running now.
    fn running(&self) -> bool {
        !self.ram.0.lock().unwrap().paused
    }
}

impl MigrationSource for FakeSource {
    fn machine(&self) -> Machine {
        self.machine.clone()
    }
    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.ram.0.lock().unwrap();
        let off = first_page as usize * PAGE_SIZE;
        let src = g
            .bytes
            .get(off..off + buf.len())
            .ok_or_else(|| io::Error::other("read past RAM"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> io::Result<()> {
        self.calls.start_log += 1;
        self.ram.0.lock().unwrap().logging = true;
        Ok(())
    }
    fn fetch_dirty(&mut self) -> io::Result<Vec<u64>> {
        for p in 0..self.churn {
            self.ram.write_page(p, (self.calls.start_log as u8) ^ 0x5a);
        }
        let mut g = self.ram.0.lock().unwrap();
        let n = g.dirty.len();
        Ok(std::mem::replace(&mut g.dirty, vec![0; n]))
    }
    fn stop_dirty_log(&mut self) {
        self.calls.stop_log += 1;
        self.ram.0.lock().unwrap().logging = false;
    }
    fn pause_and_save(&mut self) -> io::Result<Vec<u8>> {
        self.calls.pause += 1;
        let mut g = self.ram.0.lock().unwrap();
        g.paused = true;
        if self.fail_pause {
            return Err(io::Error::other("a device would not quiesce"));
        }
        self.at_pause = Some(g.bytes.clone());
        Ok(self.state.clone())
    }
    fn resume(&mut self) {
        self.calls.resume += 1;
        self.ram.0.lock().unwrap().paused = false;
    }
}

struct FakeTarget {
    machine: Machine,
    ram: Vec<u8>,
    restored: Option<Vec<u8>>,
    running: bool,
    written_pages: u64,
    zeroed_pages: u64,
    fail_restore: bool,
    fail_run: bool,
}

impl FakeTarget {
    fn new(size: u64) -> Self {
        FakeTarget {
            machine: machine(size),
            ram: vec![0; size as usize],
            restored: None,
            running: false,
            written_pages: 0,
            zeroed_pages: 0,
            fail_restore: false,
            fail_run: false,
        }
    }
}

impl MigrationTarget for FakeTarget {
    fn machine(&self) -> Machine {
        self.machine.clone()
    }
    fn write_pages(&mut self, first_page: u64, data: &[u8]) -> io::Result<()> {
        let off = first_page as usize * PAGE_SIZE;
        self.ram[off..off + data.len()].copy_from_slice(data);
        self.written_pages += (data.len() / PAGE_SIZE) as u64;
        Ok(())
    }
    fn zero_pages(&mut self, first_page: u64, count: u64) -> io::Result<()> {
        let off = first_page as usize * PAGE_SIZE;
        self.ram[off..off + count as usize * PAGE_SIZE].fill(0);
        self.zeroed_pages += count;
        Ok(())
    }
    fn restore(&mut self, state: &[u8]) -> io::Result<()> {
        if self.fail_restore {
            return Err(io::Error::other("no such disk"));
        }
        self.restored = Some(state.to_vec());
        Ok(())
    }
    fn run(&mut self) -> io::Result<()> {
        assert!(self.restored.is_some() && !self.running);
        if self.fail_run {
            return Err(io::Error::other("vCPU thread would not start"));
        }
        self.running = true;
        Ok(())
    }
}

fn quick_transport() -> TransportConfig {
    TransportConfig {
        io_timeout: Duration::from_secs(20),
        secret: None,
    }
}

fn send_cfg() -> SendConfig {
    SendConfig {
        transport: quick_transport(),
        restore_timeout: Duration::from_secs(20),
        ..SendConfig::default()
    }
}

fn recv_cfg() -> ReceiveConfig {
    ReceiveConfig {
        accept_timeout: Duration::from_secs(20),
        ..ReceiveConfig::default()
    }
}

type Destination = thread::JoinHandle<(FakeTarget, Result<ReceiveReport, MigrationError>)>;

/// Runs a real receiver for `target` on `addr` in a thread.
fn spawn_receiver(
    addr: &Address,
    transport: TransportConfig,
    mut target: FakeTarget,
) -> (Address, Destination) {
    let listener = Listener::bind(addr, &transport).unwrap();
    let bound = listener.local_address();
    let h = thread::spawn(move || {
        let r = receive(&listener, &mut target, &recv_cfg());
        (target, r)
    });
    (bound, h)
}

fn unix_addr(dir: &TempDir) -> Address {
    Address::Unix(dir.path().join("sub").join("mig.sock"))
}

/// Runs a real receiver for `target` on a Unix socket in a fresh private
/// directory named after `name`; the directory lives as long as the
/// returned `TempDir`.
fn spawn_unix_receiver(name: &str, target: FakeTarget) -> (TempDir, Address, Destination) {
    let dir = TempDir::new(name);
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), target);
    (dir, addr, dest)
}

/// A source's Hello for a machine of `size` bytes of RAM.
fn hello(format_version: u32, vmm_version: &str, size: u64) -> Message {
    Message::Hello(protocol::Hello {
        format_version,
        vmm_version: vmm_version.into(),
        machine: machine(size),
    })
}

/// Connects to `addr` as a hand-driven source, says Hello for a machine of
/// `size` bytes in this format version and expects Accept.
fn connect_accepted(addr: &Address, size: u64) -> Connection {
    let mut c = transport::connect(addr, &quick_transport()).unwrap();
    protocol::send(&mut c, &hello(protocol::FORMAT_VERSION, "test", size)).unwrap();
    assert_eq!(protocol::recv(&mut c).unwrap(), Message::Accept);
    c
}

/// One run of `count` pages from `first_page`.
fn one_run(first_page: u64, count: u32) -> Vec<protocol::Run> {
    vec![protocol::Run { first_page, count }]
}

/// Fills every `every`th page with a non-zero pattern.
fn fill(ram: &SharedRam, every: u64) {
    let mut g = ram.0.lock().unwrap();
    let pages = g.bytes.len() / PAGE_SIZE;
    for p in (0..pages).step_by(every as usize) {
        let off = p * PAGE_SIZE;
        for (i, b) in g.bytes[off..off + PAGE_SIZE].iter_mut().enumerate() {
            *b = (p as u8) ^ (i as u8) | 1;
        }
    }
}

mod channel;
mod failures;
mod migrate;
