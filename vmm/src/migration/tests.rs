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
}

impl FakeSource {
    fn new(ram: Arc<SharedRam>, size: u64) -> Self {
        FakeSource {
            ram,
            machine: machine(size),
            state: (0..100_000u32).map(|i| (i % 251) as u8).collect(),
            calls: Calls::default(),
            at_pause: None,
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
    written_pages: u64,
    zeroed_pages: u64,
    fail_restore: bool,
}

impl FakeTarget {
    fn new(size: u64) -> Self {
        FakeTarget {
            machine: machine(size),
            ram: vec![0; size as usize],
            restored: None,
            written_pages: 0,
            zeroed_pages: 0,
            fail_restore: false,
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
    fn restore_and_run(&mut self, state: &[u8]) -> io::Result<()> {
        if self.fail_restore {
            return Err(io::Error::other("no such disk"));
        }
        self.restored = Some(state.to_vec());
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
        resumed_timeout: Duration::from_secs(20),
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

#[test]
fn a_busy_guest_migrates_byte_for_byte() {
    let size = 64 * MIB;
    let pages = size / PAGE_SIZE as u64;
    let dir = TempDir::new("busy");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), FakeTarget::new(size));
    // The listener made its directory private and its socket 0600.
    let Address::Unix(sock) = &addr else {
        unreachable!()
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);

    let ram = SharedRam::new(size);
    fill(&ram, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ram, stop) = (ram.clone(), stop.clone());
        thread::spawn(move || {
            // A hot set of 2048 pages and stray writes everywhere; every
            // 5th write zeroes a page that had data.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = if x.is_multiple_of(4) {
                    x % pages
                } else {
                    x % 2048
                };
                let v = if n.is_multiple_of(5) {
                    0
                } else {
                    (n % 250) as u8 + 1
                };
                if ram.write_page(p, v) {
                    n += 1;
                }
                if n.is_multiple_of(64) {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            n
        })
    };
    let mut source = FakeSource::new(ram.clone(), size);
    // A target no round can meet, so that pre-copy runs its dirty rounds.
    let cfg = SendConfig {
        downtime: Duration::from_micros(1),
        max_rounds: 4,
        ..send_cfg()
    };
    let progress = Progress::default();
    let report = migrate(&mut source, &addr, &cfg, &progress).unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{writes} writes; {report:#?}");
    let (target, received) = dest.join().unwrap();
    let received = received.unwrap();

    assert!(writes > 0);
    let at_pause = source.at_pause.as_ref().unwrap();
    assert!(
        target.ram == *at_pause,
        "destination RAM differs from the source's at pause"
    );
    assert_eq!(target.restored.as_deref(), Some(&source.state[..]));
    assert!(report.rounds.len() >= 3, "{:?}", report.rounds);
    assert!(report.rounds[1].pages > 0, "round 1 sent no dirty pages");
    assert!(report.rounds.last().unwrap().paused);
    assert_eq!(report.rounds[0].pages, pages);
    assert_eq!(report.state_bytes, source.state.len() as u64);
    assert!(report.downtime > Duration::ZERO && report.downtime <= report.total_time);
    assert_eq!(
        source.calls,
        Calls {
            start_log: 1,
            stop_log: 1,
            pause: 1,
            resume: 0
        }
    );
    assert!(!source.running(), "the source stays paused after Resumed");
    assert_eq!(received.rounds as usize, report.rounds.len() - 1);
    assert!(target.zeroed_pages > 0, "pages zeroed after being written");
    let p = progress.snapshot();
    assert_eq!(p.phase, Phase::Done);
    assert_eq!(p.bytes_sent, report.bytes_sent);
    assert_eq!(p.ram_bytes, size);
}

#[test]
fn an_idle_guest_converges_at_once_and_zero_pages_cost_no_data() {
    let size = 64 * MIB;
    let pages = size / PAGE_SIZE as u64;
    let dir = TempDir::new("idle");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), FakeTarget::new(size));
    let ram = SharedRam::new(size);
    fill(&ram, 64); // 256 pages of data, the rest zero
    let data_pages = pages / 64;
    let mut source = FakeSource::new(ram, size);
    let report = migrate(&mut source, &addr, &send_cfg(), &Progress::default()).unwrap();
    let (target, received) = dest.join().unwrap();
    received.unwrap();

    assert_eq!(report.switch_reason, SwitchReason::Converged);
    assert!(report.rounds.len() <= 3, "{:?}", report.rounds);
    assert_eq!(report.rounds[0].data_pages, data_pages);
    assert_eq!(report.rounds[0].zero_pages, pages - data_pages);
    let data_bytes = data_pages * PAGE_SIZE as u64;
    assert!(
        report.bytes_sent < data_bytes + source.state.len() as u64 + 64 * 1024,
        "{} bytes sent for {} bytes of data",
        report.bytes_sent,
        data_bytes
    );
    assert_eq!(target.written_pages, data_pages);
    assert_eq!(target.zeroed_pages, 0, "fresh RAM needs no zeroing");
    assert!(target.ram == *source.at_pause.as_ref().unwrap());
}

#[test]
fn tcp_with_a_shared_secret_migrates() {
    let size = 4 * MIB;
    let secret = Secret::from_bytes([7; 32]);
    let transport = TransportConfig {
        secret: Some(secret),
        ..quick_transport()
    };
    let (addr, dest) = spawn_receiver(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        transport.clone(),
        FakeTarget::new(size),
    );
    let ram = SharedRam::new(size);
    fill(&ram, 3);
    let mut source = FakeSource::new(ram, size);
    let cfg = SendConfig {
        transport,
        ..send_cfg()
    };
    migrate(&mut source, &addr, &cfg, &Progress::default()).unwrap();
    let (target, r) = dest.join().unwrap();
    r.unwrap();
    assert!(target.ram == *source.at_pause.as_ref().unwrap());
}

/// What a scripted destination does after the handshake.
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// Reads Hello and closes.
    CloseInHello,
    /// Accepts, reads a few RAM frames and closes.
    CloseMidRam,
    /// Reads everything up to Complete and closes.
    CloseBeforeResumed,
    /// Reads everything up to Complete and answers Abort.
    AbortBeforeResumed,
    /// Reads everything up to Complete and never answers.
    SilentBeforeResumed,
}

fn scripted_destination(listener: Listener, how: Misbehave) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut c = listener.accept(Duration::from_secs(20)).unwrap();
        assert!(matches!(protocol::recv(&mut c).unwrap(), Message::Hello(_)));
        if let Misbehave::CloseInHello = how {
            return;
        }
        protocol::send(&mut c, &Message::Accept).unwrap();
        if let Misbehave::CloseMidRam = how {
            for _ in 0..3 {
                protocol::recv(&mut c).unwrap();
            }
            return;
        }
        while protocol::recv(&mut c).unwrap() != Message::Complete {}
        match how {
            Misbehave::AbortBeforeResumed => protocol::send(
                &mut c,
                &Message::Abort {
                    reason: "out of memory here".into(),
                },
            )
            .unwrap(),
            Misbehave::SilentBeforeResumed => {
                // Wait for the source to give up (it closes).
                let _ = protocol::recv(&mut c);
            }
            _ => {}
        }
    })
}

#[test]
fn a_destination_failing_at_each_stage_leaves_the_source_running() {
    let size = 16 * MIB;
    for how in [
        Misbehave::CloseInHello,
        Misbehave::CloseMidRam,
        Misbehave::CloseBeforeResumed,
        Misbehave::AbortBeforeResumed,
        Misbehave::SilentBeforeResumed,
    ] {
        let dir = TempDir::new("fail");
        let listener = Listener::bind(&unix_addr(&dir), &quick_transport()).unwrap();
        let addr = listener.local_address();
        let dest = scripted_destination(listener, how);
        let ram = SharedRam::new(size);
        fill(&ram, 1); // all data: round 0 is big
        let mut source = FakeSource::new(ram, size);
        let cfg = SendConfig {
            resumed_timeout: Duration::from_millis(300),
            ..send_cfg()
        };
        let progress = Progress::default();
        let e = migrate(&mut source, &addr, &cfg, &progress).unwrap_err();
        dest.join().unwrap();
        let msg = e.to_string();
        let paused = source.calls.pause;
        match how {
            Misbehave::CloseInHello => {
                assert_eq!(e.stage, Stage::Hello, "{msg}");
                assert!(msg.contains("closed"), "{msg}");
                assert_eq!(source.calls.start_log, 0);
            }
            Misbehave::CloseMidRam => {
                assert_eq!(e.stage, Stage::Memory { round: 0 }, "{msg}");
                assert!(msg.contains("round 0"), "{msg}");
                assert_eq!(paused, 0);
            }
            Misbehave::CloseBeforeResumed => {
                assert_eq!(e.stage, Stage::AwaitResumed, "{msg}");
                assert!(msg.contains("closed"), "{msg}");
            }
            Misbehave::AbortBeforeResumed => {
                assert_eq!(e.stage, Stage::AwaitResumed, "{msg}");
                assert!(msg.contains("out of memory here"), "{msg}");
            }
            Misbehave::SilentBeforeResumed => {
                assert_eq!(e.stage, Stage::AwaitResumed, "{msg}");
                assert!(msg.contains("no answer within"), "{msg}");
            }
        }
        if matches!(how, Misbehave::CloseInHello | Misbehave::CloseMidRam) {
            assert_eq!(paused, 0, "{how:?}");
        } else {
            assert_eq!(paused, 1, "{how:?}");
        }
        // resume() exactly once for each pause, never without one.
        assert_eq!(source.calls.resume, paused, "{how:?}: {msg}");
        assert_eq!(source.calls.stop_log, source.calls.start_log, "{how:?}");
        assert!(source.running(), "{how:?}: the source VM must run on");
        assert_eq!(progress.snapshot().phase, Phase::Failed);
    }
}

#[test]
fn a_refusing_destination_says_why() {
    let dir = TempDir::new("refuse");
    let (addr, dest) = spawn_receiver(
        &unix_addr(&dir),
        quick_transport(),
        FakeTarget::new(8 * MIB),
    );
    let ram = SharedRam::new(4 * MIB);
    let mut source = FakeSource::new(ram, 4 * MIB);
    let e = migrate(&mut source, &addr, &send_cfg(), &Progress::default()).unwrap_err();
    assert_eq!(e.stage, Stage::Hello);
    assert!(matches!(e.kind, ErrorKind::Refused(_)), "{e}");
    assert!(e.to_string().contains("RAM size differs"), "{e}");
    assert_eq!(source.calls, Calls::default());
    let (target, r) = dest.join().unwrap();
    let de = r.unwrap_err();
    assert_eq!(de.stage, Stage::Hello);
    assert!(target.restored.is_none());

    // Devices: same kinds, different ids.
    let mut other = FakeTarget::new(4 * MIB);
    other.machine.devices[1].id = "eth1".into();
    let dir2 = TempDir::new("refuse2");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir2), quick_transport(), other);
    let mut source = FakeSource::new(SharedRam::new(4 * MIB), 4 * MIB);
    let e = migrate(&mut source, &addr, &send_cfg(), &Progress::default()).unwrap_err();
    assert!(e.to_string().contains("devices differ"), "{e}");
    dest.join().unwrap().1.unwrap_err();
}

#[test]
fn a_failed_restore_resumes_the_source() {
    let size = 4 * MIB;
    let mut target = FakeTarget::new(size);
    target.fail_restore = true;
    let dir = TempDir::new("restore");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), target);
    let mut source = FakeSource::new(SharedRam::new(size), size);
    let e = migrate(&mut source, &addr, &send_cfg(), &Progress::default()).unwrap_err();
    assert_eq!(e.stage, Stage::AwaitResumed);
    assert!(e.to_string().contains("no such disk"), "{e}");
    assert_eq!(source.calls.resume, 1);
    assert!(source.running());
    let de = dest.join().unwrap().1.unwrap_err();
    assert_eq!(de.stage, Stage::Restore);
}

/// Forwards `src` to `dst` until `limit` bytes, then cuts both.
fn cut_after(mut src: TcpStream, mut dst: TcpStream, limit: usize) {
    let mut buf = [0u8; 8192];
    let mut total = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n.min(limit - total),
        };
        if dst.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n;
        if total >= limit {
            break;
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
}

#[test]
fn a_connection_cut_mid_ram_fails_both_ends_cleanly() {
    let size = 16 * MIB;
    let (dest_addr, dest) = spawn_receiver(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        quick_transport(),
        FakeTarget::new(size),
    );
    let Address::Tcp { host, port } = dest_addr else {
        unreachable!()
    };
    // A proxy that passes the handshake, Hello and about 1 MiB, then cuts
    // both ways in the middle of a frame.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let proxy_thread = thread::spawn(move || {
        let (from_src, _) = proxy.accept().unwrap();
        let to_dst = TcpStream::connect((host.as_str(), port)).unwrap();
        let back = thread::spawn({
            let (a, b) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
            move || cut_after(a, b, usize::MAX)
        });
        cut_after(from_src, to_dst, (MIB + 1234) as usize);
        back.join().unwrap();
    });
    let ram = SharedRam::new(size);
    fill(&ram, 1);
    let mut source = FakeSource::new(ram, size);
    let addr: Address = format!("tcp:127.0.0.1:{proxy_port}").parse().unwrap();
    let e = migrate(&mut source, &addr, &send_cfg(), &Progress::default()).unwrap_err();
    proxy_thread.join().unwrap();
    assert_eq!(e.stage, Stage::Memory { round: 0 }, "{e}");
    assert!(source.running());
    assert_eq!(source.calls.resume, 0);
    assert_eq!(source.calls.stop_log, 1);
    let (target, r) = dest.join().unwrap();
    let de = r.unwrap_err();
    assert_eq!(de.stage, Stage::Memory { round: 0 }, "{de}");
    assert!(de.to_string().contains("closed"), "{de}");
    assert!(target.restored.is_none());
}

#[test]
fn a_source_vanishing_mid_ram_leaves_the_destination_untouched() {
    let size = 4 * MIB;
    let dir = TempDir::new("vanish");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), FakeTarget::new(size));
    let mut c = transport::connect(&addr, &quick_transport()).unwrap();
    protocol::send(
        &mut c,
        &Message::Hello(protocol::Hello {
            format_version: protocol::FORMAT_VERSION,
            vmm_version: "test".into(),
            machine: machine(size),
        }),
    )
    .unwrap();
    assert_eq!(protocol::recv(&mut c).unwrap(), Message::Accept);
    protocol::send(
        &mut c,
        &Message::Pages {
            runs: vec![protocol::Run {
                first_page: 5,
                count: 1,
            }],
            data: vec![9; PAGE_SIZE],
        },
    )
    .unwrap();
    drop(c);
    let (target, r) = dest.join().unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.stage, Stage::Memory { round: 0 }, "{e}");
    assert!(e.to_string().contains("closed"), "{e}");
    assert!(target.restored.is_none());
    assert_eq!(target.written_pages, 1);
}

#[test]
fn a_source_sending_pages_past_ram_is_refused() {
    let size = 4 * MIB;
    let dir = TempDir::new("past");
    let (addr, dest) = spawn_receiver(&unix_addr(&dir), quick_transport(), FakeTarget::new(size));
    let mut c = transport::connect(&addr, &quick_transport()).unwrap();
    protocol::send(
        &mut c,
        &Message::Hello(protocol::Hello {
            format_version: protocol::FORMAT_VERSION,
            vmm_version: "test".into(),
            machine: machine(size),
        }),
    )
    .unwrap();
    assert_eq!(protocol::recv(&mut c).unwrap(), Message::Accept);
    protocol::send(
        &mut c,
        &Message::ZeroPages {
            runs: vec![protocol::Run {
                first_page: 1023,
                count: 2,
            }],
        },
    )
    .unwrap();
    // The destination says why before closing.
    match protocol::recv(&mut c).unwrap() {
        Message::Abort { reason } => assert!(reason.contains("past the end of RAM"), "{reason}"),
        m => panic!("{m:?}"),
    }
    let e = dest.join().unwrap().1.unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Invalid(_)), "{e}");
}

#[test]
fn a_wrong_secret_is_refused_both_ways() {
    let with = |b: u8| TransportConfig {
        secret: Some(Secret::from_bytes([b; 32])),
        ..quick_transport()
    };
    let cases = [
        (with(1), with(2), "does not know the shared secret"),
        (with(1), quick_transport(), "uses a shared secret"),
        (quick_transport(), with(1), "uses no shared secret"),
    ];
    for (server_cfg, client_cfg, client_msg) in cases {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), &server_cfg).unwrap();
        let addr = l.local_address();
        let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
        let ce = transport::connect(&addr, &client_cfg).unwrap_err();
        let se = server.join().unwrap().unwrap_err();
        assert!(matches!(ce, TransportError::Auth(_)), "{ce}");
        assert!(matches!(se, TransportError::Auth(_)), "{se}");
        let (ce, se) = (ce.to_string(), se.to_string());
        assert!(
            ce.contains(client_msg) || ce.contains("the destination uses"),
            "client: {ce}"
        );
        assert!(!se.is_empty());
    }
    // The same secret on both sides passes.
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), &with(3)).unwrap();
    let addr = l.local_address();
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    transport::connect(&addr, &with(3)).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_source_with_the_wrong_secret_is_refused_by_the_destination() {
    // The destination checks the source's proof, not only the reverse: a
    // client that knows no secret but replays the protocol fails.
    let l = Listener::bind(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        &TransportConfig {
            secret: Some(Secret::from_bytes([4; 32])),
            ..quick_transport()
        },
    )
    .unwrap();
    let Address::Tcp { port, .. } = l.local_address() else {
        unreachable!()
    };
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut greeting = b"KILNMIG\x01\x01".to_vec();
    greeting.extend_from_slice(&[0; 32]);
    s.write_all(&greeting).unwrap();
    let mut answer = [0u8; 8 + 1 + 32 + 32];
    s.read_exact(&mut answer).unwrap();
    s.write_all(&[0xab; 32]).unwrap(); // a forged proof
    let e = server.join().unwrap().unwrap_err();
    assert!(
        e.to_string()
            .contains("the source does not know the shared secret"),
        "{e}"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no acceptance byte for a forged proof");
}

#[test]
fn tcp_without_a_secret_stays_on_loopback() {
    let e = Listener::bind(&"tcp:0.0.0.0:0".parse().unwrap(), &quick_transport()).unwrap_err();
    assert!(matches!(e, TransportError::NotLoopback(_)), "{e}");
    // 192.0.2.0/24 is TEST-NET-1: refused before any packet is sent.
    let e =
        transport::connect(&"tcp:192.0.2.1:4444".parse().unwrap(), &quick_transport()).unwrap_err();
    assert!(matches!(e, TransportError::NotLoopback(_)), "{e}");
    assert!(e.to_string().contains("shared secret"), "{e}");
    // With a secret, listening on all addresses is allowed.
    let with = TransportConfig {
        secret: Some(Secret::from_bytes([1; 32])),
        ..quick_transport()
    };
    Listener::bind(&"tcp:0.0.0.0:0".parse().unwrap(), &with).unwrap();
}

#[test]
fn secret_files_are_private_and_exactly_256_bits() {
    let dir = TempDir::new("secret");
    let write = |name: &str, data: &[u8], mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
    let a = Secret::from_file(&write("hex", hex.as_bytes(), 0o600)).unwrap();
    let b = Secret::from_file(&write(
        "raw",
        &[
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
            0xcc, 0xdd, 0xee, 0xff,
        ],
        0o400,
    ))
    .unwrap();
    assert_eq!(format!("{a:?}"), "Secret(..)");
    // Same key: a handshake between them passes.
    let l = Listener::bind(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        &TransportConfig {
            secret: Some(a),
            ..quick_transport()
        },
    )
    .unwrap();
    let addr = l.local_address();
    let server = thread::spawn(move || l.accept(Duration::from_secs(20)).map(|_| ()));
    transport::connect(
        &addr,
        &TransportConfig {
            secret: Some(b),
            ..quick_transport()
        },
    )
    .unwrap();
    server.join().unwrap().unwrap();

    let e = Secret::from_file(&write("open", hex.as_bytes(), 0o644)).unwrap_err();
    assert!(e.to_string().contains("make it 0600"), "{e}");
    let e = Secret::from_file(&write("short", b"abcd", 0o600)).unwrap_err();
    assert!(e.to_string().contains("256-bit"), "{e}");
    assert!(
        !e.to_string().contains("abcd"),
        "the secret is never printed: {e}"
    );
    assert!(Secret::from_file(&dir.path().join("missing")).is_err());
}

#[test]
fn addresses_parse_with_clear_errors() {
    assert_eq!(
        "unix:/run/x.sock".parse::<Address>().unwrap(),
        Address::Unix("/run/x.sock".into())
    );
    assert_eq!(
        "tcp:10.0.0.2:7000".parse::<Address>().unwrap(),
        Address::Tcp {
            host: "10.0.0.2".into(),
            port: 7000
        }
    );
    let v6: Address = "tcp:[::1]:7000".parse().unwrap();
    assert_eq!(
        v6,
        Address::Tcp {
            host: "::1".into(),
            port: 7000
        }
    );
    assert_eq!(v6.to_string(), "tcp:[::1]:7000");
    for (bad, why) in [
        ("/run/x.sock", "expected unix:/path or tcp:HOST:PORT"),
        ("unix:", "path is empty"),
        ("tcp:host", "a port after"),
        ("tcp::7000", "host is empty"),
        ("tcp:h:70000", "up to 65535"),
        ("tcp:h:http", "up to 65535"),
    ] {
        let e = bad.parse::<Address>().unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_world_writable_socket_directory_is_refused() {
    let dir = TempDir::new("open-dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = Listener::bind(
        &Address::Unix(dir.path().join("m.sock")),
        &quick_transport(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("private directory"), "{e}");
}

fn pair() -> (Connection, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Connection::from_unix_stream(a, Duration::from_secs(20)).unwrap(),
        b,
    )
}

fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

#[test]
fn a_corrupt_frame_fails_its_checksum() {
    let (mut rx, mut tx) = pair();
    let (t, p) = protocol::encode(&Message::Round { n: 7 });
    let good = raw_frame(t, &p);
    tx.write_all(&good).unwrap();
    assert_eq!(protocol::recv(&mut rx).unwrap(), Message::Round { n: 7 });
    for i in [0usize, 5, good.len() - 1] {
        let (mut rx, mut tx) = pair();
        let mut bad = good.clone();
        // Flipping the type byte to another known type, a payload byte or
        // the CRC itself: the checksum catches it.
        bad[i] ^= if i == 0 { 0x0c } else { 0x40 };
        tx.write_all(&bad).unwrap();
        let e = protocol::recv(&mut rx).unwrap_err();
        assert!(
            matches!(
                e,
                protocol::ProtocolError::Transport(TransportError::Checksum { .. })
            ),
            "byte {i}: {e}"
        );
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}

#[test]
fn an_oversize_or_unknown_frame_is_refused_before_its_payload() {
    // Nothing follows the header: reading the payload would wait out the
    // 20 s timeout; refusing it returns at once.
    let (mut rx, mut tx) = pair();
    let mut h = vec![protocol::ty::PAGES];
    h.extend_from_slice(&(transport::MAX_FRAME_LEN + 1).to_le_bytes());
    tx.write_all(&h).unwrap();
    let e = rx.recv_frame(|_| true).unwrap_err();
    assert!(matches!(e, TransportError::Oversize { .. }), "{e}");

    let (mut rx, mut tx) = pair();
    let mut h = vec![0xee];
    h.extend_from_slice(&16u32.to_le_bytes());
    tx.write_all(&h).unwrap();
    let e = protocol::recv(&mut rx).unwrap_err();
    assert!(e.to_string().contains("unknown frame type 238"), "{e}");

    // A frame cut short: closed, not a hang or a panic.
    let (mut rx, mut tx) = pair();
    let f = raw_frame(protocol::ty::STATE, &[1; 100]);
    tx.write_all(&f[..50]).unwrap();
    drop(tx);
    let e = protocol::recv(&mut rx).unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");

    // A sender cannot build an oversize frame either.
    let (mut c, _peer) = pair();
    let big = vec![0u8; transport::MAX_FRAME_LEN as usize + 1];
    assert!(matches!(
        c.send_frame(protocol::ty::STATE, &big),
        Err(TransportError::Oversize { .. })
    ));
}

#[test]
fn a_timeout_is_reported_as_such() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut c = Connection::from_unix_stream(a, Duration::from_millis(50)).unwrap();
    let e = c.recv_frame(|_| true).unwrap_err();
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
}

#[test]
fn transport_throughput_can_be_measured() {
    let bps = transport::unix_throughput(16 * MIB, MIB as usize).unwrap();
    assert!(bps > 0.0);
    eprintln!(
        "migration transport over a unix socket pair: {:.0} MiB/s",
        bps / MIB as f64
    );
}

#[test]
fn a_stray_peer_does_not_end_the_wait_for_the_source() {
    let size = 4 * MIB;
    let with = |b: u8| TransportConfig {
        secret: Some(Secret::from_bytes([b; 32])),
        ..quick_transport()
    };
    let (addr, dest) = spawn_receiver(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        with(9),
        FakeTarget::new(size),
    );
    // A peer with another secret, then one that says nothing and leaves.
    let e = transport::connect(&addr, &with(8)).unwrap_err();
    assert!(matches!(e, TransportError::Auth(_)), "{e}");
    let Address::Tcp { port, .. } = &addr else {
        unreachable!()
    };
    drop(TcpStream::connect(("127.0.0.1", *port)).unwrap());
    // The real source, with an empty state (delivered as such).
    let ram = SharedRam::new(size);
    fill(&ram, 5);
    let mut source = FakeSource::new(ram, size);
    source.state.clear();
    let cfg = SendConfig {
        transport: with(9),
        ..send_cfg()
    };
    migrate(&mut source, &addr, &cfg, &Progress::default()).unwrap();
    let (target, r) = dest.join().unwrap();
    assert_eq!(r.unwrap().state_bytes, 0);
    assert_eq!(target.restored.as_deref(), Some(&[][..]));
    assert!(target.ram == *source.at_pause.as_ref().unwrap());
}
