//! `kiln-store-bench`: the storage benchmark behind `scripts/bench-store`.
//!
//! Runs the same write workload against a raw local file (pwrite +
//! fdatasync), a 1-replica and a 3-replica volume driven through the
//! writer daemon's in-process `VolumeIo` (the path a vhost-user-blk backend
//! in the daemon uses), and optionally the 3-replica volume through
//! `VolumeClient` (the daemon's unix socket). The writer daemon runs in
//! this process (`server::start`); the two other replicas are real
//! `kiln-store serve` processes on 127.0.0.1. Prints a markdown table.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_store::crypt::VolumeKey;
use kiln_store::meta::ReplicaAddr;
use kiln_store::proto::{Request, Response, VolumeStatus};
use kiln_store::server::{self, Daemon};
use kiln_store::{VolumeClient, VolumeIo};

const MIB: u64 = 1 << 20;

/// Storage benchmark: raw file vs 1- and 3-replica kiln-store volumes on loopback.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Work directory for the raw file and the nodes' data dirs (use a real
    /// disk filesystem, not tmpfs, so fdatasync means something). Emptied first.
    #[arg(long, default_value = "target/bench-store")]
    dir: PathBuf,
    /// The kiln-store binary to run the two other replicas with (default:
    /// next to this binary).
    #[arg(long)]
    kiln_store: Option<PathBuf>,
    /// Flush (fdatasync on the raw file) after every N writes.
    #[arg(long, default_value_t = 32)]
    flush_every: u64,
    /// MiB written by the sequential pass (on fresh, unallocated space); the
    /// random writes then land inside this span.
    #[arg(long, default_value_t = 512)]
    seq_mib: u64,
    /// Size of each sequential write, KiB. 512 KiB is what a Linux guest's
    /// virtio-blk writeback sends with seg_max 128 (max_sectors_kb 1280).
    #[arg(long, default_value_t = 512)]
    seq_kib: u64,
    /// Number of 4 KiB random writes.
    #[arg(long, default_value_t = 4096)]
    random_ops: u64,
    /// MiB written to the 3-replica volume while one replica is down, before
    /// timing its resync (0 skips the resync test).
    #[arg(long, default_value_t = 1024)]
    resync_mib: u64,
    /// Also measure the 3-replica volume through the daemon's unix socket
    /// (VolumeClient).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_row: bool,
    /// The writer daemon's `--reply-poll-us` (how long a lone small write
    /// polls for its replicas' answers; 0 never polls).
    #[arg(long, default_value_t = kiln_store::transport::poll::DEFAULT_REPLY_POLL.as_micros() as u64)]
    reply_poll_us: u64,
    /// Targets to run, comma-separated: raw, raw3, r1, r3, r3enc, socket
    /// (the raw file always runs: it is the reference). raw3 writes three
    /// raw files at once, one thread each: what three copies cost on this
    /// one disk, the bound for three replicas on loopback. r3enc is r3
    /// encrypted (XTS-AES-256), run right after it.
    #[arg(
        long,
        default_value = "raw,raw3,r1,r3,r3enc,socket",
        value_delimiter = ','
    )]
    cases: Vec<String>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Writes in flight at once (writer threads, each with its own share
    /// of the writes), comma-separated to run each target at several
    /// depths: `--iodepth 1,32`.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    iodepth: Vec<u64>,
}

/// XTS-AES-256 throughput of this CPU, one core, 4 KiB blocks in place.
fn cipher_mib_s() -> Result<f64> {
    let c = kiln_store::crypt::BlockCipher::new(&VolumeKey::random()?)?;
    let mut buf = vec![0x5au8; 4 * MIB as usize];
    let t0 = Instant::now();
    let rounds = 32;
    for i in 0..rounds {
        c.encrypt(&mut buf, i * 4 * MIB)?;
    }
    Ok((rounds * 4) as f64 / t0.elapsed().as_secs_f64())
}

/// The raw-file baseline: pwrite, flush = fdatasync.
struct RawFile(File, u64);

impl VolumeIo for RawFile {
    fn size(&self) -> kiln_store::Result<u64> {
        Ok(self.1)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> kiln_store::Result<()> {
        Ok(self.0.read_exact_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> kiln_store::Result<()> {
        Ok(self.0.write_all_at(buf, offset)?)
    }
    fn flush(&self) -> kiln_store::Result<()> {
        Ok(self.0.sync_data()?)
    }
    fn discard(&self, _offset: u64, _len: u64) -> kiln_store::Result<()> {
        Ok(())
    }
}

/// A `kiln-store serve` child, killed on drop.
struct Node {
    id: String,
    addr: String,
    data: PathBuf,
    socket: PathBuf,
    bin: PathBuf,
    tls: kiln_store::transport::TlsFiles,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) -> Result<()> {
        let log = File::create(self.data.with_extension("log"))?;
        let child = Command::new(&self.bin)
            .args(["serve", "--node-id", &self.id, "--listen", &self.addr])
            .arg("--data")
            .arg(&self.data)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--scrub-rate", "0"])
            .args(self.tls.serve_args())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let t0 = Instant::now();
        while !server::socket_in_use(&self.socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "node {} exited while starting ({status}; see {}.log)",
                    self.id,
                    self.data.display()
                );
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "node {} did not start (see {}.log)",
                    self.id,
                    self.data.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on, for a replica's listener. Taken
/// from below the kernel's ephemeral range (`ip_local_port_range`): a port
/// from port 0 lies inside it, where the outgoing connections of the
/// replicas and of the rest of the machine take their local ports, and one
/// of them can take it before the replica binds it, or while a killed
/// replica is down before its restart on the same address.
fn free_port() -> Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let span = u32::from(high - low);
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id() % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = low + ((start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {low}..{high}")
}

fn call(d: &Daemon, req: Request) -> Result<Response> {
    Ok(d.handle(req, true, &mut |_| {}).into_result()?)
}

fn status(d: &Daemon, name: &str) -> Result<VolumeStatus> {
    match call(
        d,
        Request::VolShow {
            name: name.to_string(),
        },
    )? {
        Response::Status(s) => Ok(s),
        r => bail!("unexpected reply {r:?}"),
    }
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn fill(buf: &mut [u8], rng: &mut Xorshift) {
    for c in buf.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

#[derive(Default, Clone)]
struct Row {
    name: String,
    seq_mib_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// The whole machine's CPU time (every process, kernel included)
    /// during the random writes, per write; `None` without `/proc/stat`.
    cpu_us: Option<f64>,
}

/// CPU time the whole machine has spent busy since boot, in seconds:
/// user, nice, system, irq, softirq and steal of `/proc/stat`'s `cpu` line
/// (idle and iowait left out). Machine-wide on purpose: a replicated
/// write's cost is spread over the writer and the replica processes, and
/// much of it is the kernel's (the network stack, the file system).
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 8 {
        return None;
    }
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // SAFETY: sysconf only reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| busy as f64 / hz as f64)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Lets the disk finish what earlier targets left (writeback, freed
/// blocks), so that each target starts from the same state: the order of
/// the targets otherwise shows in their figures.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
}

/// Sequential pass over `[base, base + seq_mib)`, then random 4 KiB writes
/// inside it, a flush after every `flush_every` writes and at the end.
/// `depth` threads share the writes (each takes the next sequential chunk,
/// or does its share of the random writes), so that many are in flight.
fn workload(name: &str, io: &dyn VolumeIo, base: u64, a: &Args, depth: u64) -> Result<Row> {
    settle();
    let span = a.seq_mib * MIB;
    let chunk = a.seq_kib * 1024;
    let chunks = span.div_ceil(chunk);
    let next = AtomicU64::new(0);
    let writes = AtomicU64::new(0);
    // A flush after every `flush_every` writes, counted over all threads.
    let after_write = || -> Result<()> {
        if (writes.fetch_add(1, Ordering::Relaxed) + 1) % a.flush_every == 0 {
            io.flush().with_context(|| format!("{name}: flush"))?;
        }
        Ok(())
    };
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let jobs: Vec<_> = (0..depth)
            .map(|t| {
                let (next, after_write) = (&next, &after_write);
                s.spawn(move || -> Result<()> {
                    let mut rng = Xorshift((a.seed + t).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                    let mut buf = vec![0u8; chunk as usize];
                    fill(&mut buf, &mut rng);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks {
                            return Ok(());
                        }
                        let off = i * chunk;
                        let len = chunk.min(span - off) as usize;
                        // Vary the data a little so no layer can dedupe it.
                        buf[..8].copy_from_slice(&off.to_le_bytes());
                        io.write_at(&buf[..len], base + off)
                            .with_context(|| format!("{name}: sequential write at {off}"))?;
                        after_write()?;
                    }
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("bench thread panicked"))
    })?;
    io.flush()?;
    let seq = span as f64 / MIB as f64 / t0.elapsed().as_secs_f64();

    let blocks = span / 4096;
    let done = AtomicU64::new(0);
    let busy0 = machine_busy_secs();
    let t0 = Instant::now();
    let mut lat: Vec<Duration> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..depth)
            .map(|t| {
                let (done, after_write) = (&done, &after_write);
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut rng =
                        Xorshift((a.seed + 1000 + t).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                    let mut blk = vec![0u8; 4096];
                    fill(&mut blk, &mut rng);
                    let mut lat = Vec::new();
                    loop {
                        let i = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if i > a.random_ops {
                            return Ok(lat);
                        }
                        let off = rng.next() % blocks * 4096;
                        blk[..8].copy_from_slice(&i.to_le_bytes());
                        let t = Instant::now();
                        io.write_at(&blk, base + off)
                            .with_context(|| format!("{name}: random write at {off}"))?;
                        lat.push(t.elapsed());
                        after_write()?;
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for j in jobs {
            all.extend(j.join().expect("bench thread panicked")?);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    io.flush()?;
    let iops = a.random_ops as f64 / t0.elapsed().as_secs_f64();
    let cpu_us = busy0
        .zip(machine_busy_secs())
        .map(|(b0, b1)| (b1 - b0) * 1e6 / a.random_ops as f64);
    lat.sort();
    let row = Row {
        name: name.to_string(),
        seq_mib_s: seq,
        iops,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        cpu_us,
    };
    eprintln!(
        "kiln-store-bench: {name}, depth {depth}: {seq:.0} MiB/s sequential, {iops:.0} IOPS (p50 {:.0} us, p99 {:.0} us)",
        row.p50_us, row.p99_us
    );
    Ok(row)
}

fn fs_note(dir: &Path) -> String {
    let out = Command::new("df")
        .arg("--output=source,fstype")
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        _ => "unknown filesystem".into(),
    }
}

fn main() -> Result<()> {
    // The replicas run in this process: a panic in one of their threads
    // must end the run, not leave the others waiting on it.
    kiln_crash::abort_on_panic();
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if a.flush_every == 0 || a.seq_kib == 0 || a.seq_kib % 4 != 0 || a.seq_mib == 0 {
        bail!("--flush-every, --seq-mib and --seq-kib must be > 0, --seq-kib a multiple of 4");
    }
    let bin = match &a.kiln_store {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .join("kiln-store"),
    };
    if !bin.exists() {
        bail!(
            "{} not found (build kiln-store or pass --kiln-store)",
            bin.display()
        );
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let span = a.seq_mib * MIB;
    if a.iodepth.is_empty() || a.iodepth.iter().any(|d| *d == 0 || *d > 256) {
        bail!("--iodepth takes depths from 1 to 256");
    }
    // Each depth writes its own span (fresh space); the resync test after.
    let depths = a.iodepth.len() as u64;
    let vol_size = span * depths + span.max(a.resync_mib * MIB) + 64 * MIB;
    eprintln!(
        "kiln-store-bench: data in {} ({})",
        dir.display(),
        fs_note(&dir)
    );

    let raw_file = |name: &str| -> Result<(PathBuf, RawFile)> {
        let path = dir.join(name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        f.set_len(span)?;
        Ok((path, RawFile(f, span)))
    };
    let want = |c: &str| a.cases.iter().any(|x| x == c);
    // Rows per queue depth, in the order of `--iodepth`.
    let mut tables: Vec<(u64, Vec<Row>)> = Vec::new();
    for &depth in &a.iodepth {
        let mut rows = Vec::new();
        // (a) raw file
        {
            let (path, f) = raw_file("raw.img")?;
            rows.push(workload("raw file", &f, 0, &a, depth)?);
            std::fs::remove_file(&path)?;
        }
        // (a') three raw files at once: each stream's mean rate.
        if want("raw3") {
            let files = (1..=3)
                .map(|i| raw_file(&format!("raw{i}.img")))
                .collect::<Result<Vec<_>>>()?;
            let args = &a;
            let per = std::thread::scope(|s| {
                let jobs: Vec<_> = files
                    .iter()
                    .enumerate()
                    .map(|(i, (_, f))| {
                        s.spawn(move || {
                            workload(&format!("raw file #{}", i + 1), f, 0, args, depth)
                        })
                    })
                    .collect();
                jobs.into_iter()
                    .map(|j| j.join().expect("raw3 thread panicked"))
                    .collect::<Result<Vec<_>>>()
            })?;
            let mean = |f: fn(&Row) -> f64| per.iter().map(f).sum::<f64>() / per.len() as f64;
            rows.push(Row {
                name: "3 raw files at once (per file)".into(),
                seq_mib_s: mean(|r| r.seq_mib_s),
                iops: mean(|r| r.iops),
                p50_us: mean(|r| r.p50_us),
                p99_us: mean(|r| r.p99_us),
                // The three ran at once: each saw the machine's CPU for
                // all three, so this is per write to each of the files.
                cpu_us: per
                    .iter()
                    .map(|r| r.cpu_us)
                    .sum::<Option<f64>>()
                    .map(|t| t / per.len() as f64),
            });
            for (path, _) in files {
                std::fs::remove_file(path)?;
            }
        }
        tables.push((depth, rows));
    }

    // Nodes: n1 in process (the writer), n2 and n3 as processes, all
    // replicating over mutual TLS as in production.
    let pki = dir.join("pki");
    kiln_store::pki::init(&pki, &["n1".into(), "n2".into(), "n3".into()])?;
    let tls = |id: &str| {
        let (cert, key) = kiln_store::pki::node_files(&pki, id);
        kiln_store::transport::TlsFiles {
            cert,
            key,
            ca: kiln_store::pki::ca_file(&pki),
        }
    };
    let mut nodes = Vec::new();
    for id in ["n2", "n3"] {
        let mut n = Node {
            id: id.into(),
            addr: format!("127.0.0.1:{}", free_port()?),
            data: dir.join(id),
            socket: dir.join(format!("{id}.sock")),
            bin: bin.clone(),
            tls: tls(id),
            child: None,
        };
        std::fs::create_dir_all(&n.data)?;
        n.start()?;
        nodes.push(n);
    }
    let n1_addr = format!("127.0.0.1:{}", free_port()?);
    std::fs::create_dir_all(dir.join("n1"))?;
    let daemon: Arc<Daemon> = server::start(server::Config {
        node_id: "n1".into(),
        data: vec![dir.join("n1")],
        listen: n1_addr.clone(),
        security: server::Security::Tls(tls("n1")),
        socket: dir.join("n1.sock"),
        scrub_rate: 0,
        scrub_interval: Duration::from_secs(3600),
        peer_idle_timeout: kiln_store::proto::PEER_IDLE_TIMEOUT,
        reply_poll: Duration::from_micros(a.reply_poll_us),
    })?;
    let n1 = ReplicaAddr {
        node: "n1".into(),
        addr: n1_addr,
    };
    let all: Vec<ReplicaAddr> = std::iter::once(n1.clone())
        .chain(nodes.iter().map(|n| ReplicaAddr {
            node: n.id.clone(),
            addr: n.addr.clone(),
        }))
        .collect();
    let create_with = |name: &str, replicas: Vec<ReplicaAddr>, key: Option<VolumeKey>| {
        call(
            &daemon,
            Request::VolCreate {
                name: name.into(),
                size: vol_size,
                replicas,
                key,
            },
        )
    };
    let create = |name: &str, replicas: Vec<ReplicaAddr>| create_with(name, replicas, None);

    // (b) 1 replica, (c) 3 replicas, in-process VolumeIo; each depth on
    // its own fresh span of the same volumes.
    if want("r1") {
        create("r1", vec![n1.clone()])?;
    }
    create("r3", all.clone())?;
    let r3 = daemon.volume_io("r3")?;
    if want("r3enc") {
        create_with("r3enc", all.clone(), Some(VolumeKey::random()?))?;
    }
    let sock = if a.socket_row && want("socket") {
        create("r3sock", all.clone())?;
        Some(VolumeClient::open(&dir.join("n1.sock"), "r3sock")?)
    } else {
        None
    };
    for (k, (depth, rows)) in tables.iter_mut().enumerate() {
        let (base, depth) = (k as u64 * span, *depth);
        if want("r1") {
            let io = daemon.volume_io("r1")?;
            rows.push(workload(
                "1 replica (in-process)",
                io.as_ref(),
                base,
                &a,
                depth,
            )?);
        }
        if want("r3") {
            rows.push(workload(
                "3 replicas (in-process)",
                r3.as_ref(),
                base,
                &a,
                depth,
            )?);
        }
        if want("r3enc") {
            let io = daemon.volume_io("r3enc")?;
            rows.push(workload(
                "3 replicas, encrypted (in-process)",
                io.as_ref(),
                base,
                &a,
                depth,
            )?);
        }
        if let Some(c) = &sock {
            rows.push(workload("3 replicas (unix socket)", c, base, &a, depth)?);
        }
    }

    // Resync: n3 down while resync_mib is written, then back.
    let mut resync = None;
    if a.resync_mib > 0 {
        nodes[1].kill();
        let chunk = vec![0xa5u8; MIB as usize];
        let base = span * depths; // fresh space past the workloads' spans
        let t0 = Instant::now();
        for i in 0..a.resync_mib {
            r3.write_at(&chunk, base + i * MIB)?;
            if (i + 1) % a.flush_every == 0 {
                r3.flush()?;
            }
        }
        r3.flush()?;
        let degraded = a.resync_mib as f64 / t0.elapsed().as_secs_f64();
        let st = status(&daemon, "r3")?;
        let dirty: u64 = st.replicas.iter().map(|r| r.dirty_regions).sum();
        let t0 = Instant::now();
        nodes[1].start()?;
        loop {
            let st = status(&daemon, "r3")?;
            if st.replicas.iter().all(|r| r.state == "in-sync") {
                break;
            }
            if t0.elapsed() > Duration::from_secs(1800) {
                bail!("resync did not finish in 30 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = t0.elapsed().as_secs_f64();
        let bytes = status(&daemon, "r3")?.resync_bytes;
        eprintln!(
            "kiln-store-bench: resync of {} MiB ({dirty} dirty regions) took {secs:.1} s",
            bytes / MIB
        );
        resync = Some((secs, bytes, dirty, degraded));
    }

    // Report.
    println!(
        "Data on {} ({}); flush every {} writes; sequential: {} MiB in {} KiB writes on fresh space; random: {} × 4 KiB inside that span.",
        dir.display(),
        fs_note(&dir),
        a.flush_every,
        a.seq_mib,
        a.seq_kib,
        a.random_ops
    );
    let ratio = |x: f64, of: f64| {
        if of > 0.0 {
            format!("{:.2}", x / of)
        } else {
            "-".into()
        }
    };
    for (depth, rows) in &tables {
        let raw = rows[0].clone();
        println!();
        println!("Queue depth {depth} ({depth} writes in flight):");
        println!();
        println!(
            "| target | seq write MiB/s | × raw | 4 KiB rand write IOPS | × raw | p50 µs | p99 µs | machine CPU µs / rand write |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in rows {
            println!(
                "| {} | {:.0} | {} | {:.0} | {} | {:.0} | {:.0} | {} |",
                r.name,
                r.seq_mib_s,
                ratio(r.seq_mib_s, raw.seq_mib_s),
                r.iops,
                ratio(r.iops, raw.iops),
                r.p50_us,
                r.p99_us,
                r.cpu_us.map_or("-".into(), |c| format!("{c:.0}"))
            );
        }
        let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
        if let (Some(r3), Some(raw3)) = (find("3 replicas (in"), find("3 raw files")) {
            println!();
            println!(
                "Depth {depth}: 3 replicas against three raw files written at once on the same disk: sequential {}×, random {}×.",
                ratio(r3.seq_mib_s, raw3.seq_mib_s),
                ratio(r3.iops, raw3.iops)
            );
            if let (Some(c3), Some(c_raw3)) = (r3.cpu_us, raw3.cpu_us) {
                println!(
                    "Machine CPU per random write: {c3:.0} µs with 3 replicas, {c_raw3:.0} µs for one write to each of three raw files; \
                     with both bound by the CPUs, 3 replicas run at {}× of three raw files.",
                    ratio(c_raw3, c3)
                );
            }
        }
        if let (Some(e), Some(p)) = (find("3 replicas, encrypted"), find("3 replicas (in")) {
            println!();
            println!(
                "Depth {depth}: encrypted (XTS-AES-256 on the writer) against plaintext, 3 replicas, same run: \
                 sequential **{}×**, random **{}×**; the cipher alone runs at {:.0} MiB/s on one core here.",
                ratio(e.seq_mib_s, p.seq_mib_s),
                ratio(e.iops, p.iops),
                cipher_mib_s()?
            );
        }
    }
    if let Some((secs, bytes, dirty, degraded)) = resync {
        println!();
        println!(
            "Resync: {} MiB written (1 MiB writes, {degraded:.0} MiB/s degraded) while n3 was killed; \
             restart to in-sync took **{secs:.1} s** ({} MiB copied, {dirty} dirty regions, {:.0} MiB/s).",
            a.resync_mib,
            bytes / MIB,
            bytes as f64 / MIB as f64 / secs
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's busy time is read and moves forward while this
    /// thread spins (a parse that skipped a field or misread the clock
    /// tick would give `None` or no progress).
    #[test]
    fn machine_busy_time_grows_while_a_cpu_works() {
        let b0 = machine_busy_secs().expect("/proc/stat has a cpu line");
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b1 = machine_busy_secs().expect("/proc/stat has a cpu line");
        assert!(b1 - b0 >= 0.2, "busy {b0} -> {b1} over 0.3 s of spinning");
        assert!(b0 > 0.0);
    }
}
