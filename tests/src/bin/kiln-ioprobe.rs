//! kiln-ioprobe: the disk and network workloads of `scripts/bench-io`.
//!
//! Built static, it runs inside the benchmark guest (whose initramfs has only
//! busybox) and on the test host. Every mode prints one line
//! `IOPROBE MODE key=value ...` on stdout.
//!
//! ```text
//! kiln-ioprobe seq-write DEV MIB        1 MiB O_DIRECT writes, then fdatasync
//! kiln-ioprobe seq-read DEV MIB         1 MiB O_DIRECT reads
//! kiln-ioprobe rand-read DEV SECS JOBS  4 KiB O_DIRECT reads at random offsets,
//!                                       JOBS threads (one request in flight each)
//! kiln-ioprobe tcp-sink PORT            accept one connection, read to EOF
//! kiln-ioprobe tcp-source PORT MIB      accept one connection, send MIB MiB
//! kiln-ioprobe tcp-send ADDR:PORT MIB   connect, send MIB MiB
//! kiln-ioprobe tcp-recv ADDR:PORT       connect, read to EOF
//! ```
//!
//! Throughput of a TCP transfer is measured by the receiving side, from its
//! first byte to EOF.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

/// A zeroed buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, BLOCK).expect("buffer layout");
        // SAFETY: the layout has a non-zero size; the pointer is checked.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// xorshift64: cheap, deterministic data and offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn open_direct(dev: &str, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("{dev}: {e}"))
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn seq(dev: &str, mib: usize, write: bool) -> Result<String, String> {
    let f = open_direct(dev, write)?;
    let mut buf = AlignedBuf::new(MIB);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for chunk in buf.as_mut().chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let start = Instant::now();
    for i in 0..mib {
        let off = (i * MIB) as u64;
        if write {
            f.write_all_at(buf.as_mut(), off)
        } else {
            f.read_exact_at(buf.as_mut(), off)
        }
        .map_err(|e| format!("{dev} at {off}: {e}"))?;
    }
    if write {
        f.sync_data()
            .map_err(|e| format!("{dev}: fdatasync: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "mib={mib} seconds={secs:.3} mib_s={:.1}",
        mib_s((mib * MIB) as u64, secs)
    ))
}

fn rand_read(dev: &str, secs: u64, jobs: usize) -> Result<String, String> {
    let size = File::open(dev)
        .and_then(|mut f| f.seek_end())
        .map_err(|e| format!("{dev}: {e}"))?;
    let blocks = size / BLOCK as u64;
    if blocks == 0 {
        return Err(format!("{dev} is smaller than {BLOCK} bytes"));
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..jobs)
        .map(|j| {
            let f = open_direct(dev, false)?;
            let (done, stop) = (done.clone(), stop.clone());
            Ok(std::thread::spawn(move || -> Result<(), String> {
                let mut buf = AlignedBuf::new(BLOCK);
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (j as u64 + 1));
                while !stop.load(Ordering::Relaxed) {
                    let off = (rng.next() % blocks) * BLOCK as u64;
                    f.read_exact_at(buf.as_mut(), off)
                        .map_err(|e| format!("read at {off}: {e}"))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }))
        })
        .collect::<Result<_, String>>()?;
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| "a reader panicked".to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    Ok(format!(
        "jobs={jobs} requests={n} seconds={secs:.3} iops={:.0}",
        n as f64 / secs
    ))
}

trait SeekEnd {
    fn seek_end(&mut self) -> std::io::Result<u64>;
}

impl SeekEnd for File {
    fn seek_end(&mut self) -> std::io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        self.seek(SeekFrom::End(0))
    }
}

/// Reads to EOF; the clock starts at the first byte.
fn receive(mut s: TcpStream) -> Result<String, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut start = None;
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        start.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(format!(
        "bytes={total} seconds={secs:.3} mib_s={:.1}",
        mib_s(total, secs.max(1e-9))
    ))
}

fn send(mut s: TcpStream, mib: usize) -> Result<String, String> {
    let mut buf = vec![0u8; MIB];
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    for _ in 0..mib {
        s.write_all(&buf).map_err(|e| format!("send: {e}"))?;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    // Wait for the receiver to close: everything arrived.
    let _ = s.read(&mut buf);
    Ok(format!("bytes={}", mib * MIB))
}

fn accept(port: &str) -> Result<TcpStream, String> {
    let l =
        TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("bind {port}: {e}"))?;
    let (s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    Ok(s)
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    // The listener may still be starting.
    for _ in 0..50 {
        if let Ok(s) = TcpStream::connect(addr) {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))
}

fn num<T: std::str::FromStr>(s: Option<&String>, what: &str) -> Result<T, String> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what} missing or not a number"))
}

fn run(args: &[String]) -> Result<String, String> {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "seq-write" => seq(arg(1), num(args.get(2), "MIB")?, true),
        "seq-read" => seq(arg(1), num(args.get(2), "MIB")?, false),
        "rand-read" => rand_read(arg(1), num(args.get(2), "SECS")?, num(args.get(3), "JOBS")?),
        "tcp-sink" => receive(accept(arg(1))?),
        "tcp-source" => send(accept(arg(1))?, num(args.get(2), "MIB")?),
        "tcp-send" => send(connect(arg(1))?, num(args.get(2), "MIB")?),
        "tcp-recv" => receive(connect(arg(1))?),
        other => Err(format!(
            "unknown mode {other:?} (seq-write, seq-read, rand-read, tcp-sink, tcp-source, tcp-send, tcp-recv)"
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("IOPROBE {} {line}", args[0]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kiln-ioprobe: error: {e}");
            ExitCode::FAILURE
        }
    }
}
