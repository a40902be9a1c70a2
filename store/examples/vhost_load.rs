//! A vhost-user-blk load generator for `scripts/bench-vhost`: the guest's
//! side of a virtio-blk disk (the `vhost` crate's frontend over memfd
//! memory, split virtqueues laid out as the tests lay them out) driving any
//! vhost-user-blk backend at a fixed queue depth, natively, with no VMM and
//! no emulated CPU in the way. It runs one workload for a while and prints
//! one line: `VHOST-LOAD job=… depth=… ops=… secs=… iops=… mib_s=…
//! lat_us=… errors=…`.
//!
//! Usage: `vhost_load SOCKET JOB DEPTH SECS SIZE_MIB`, JOB one of
//! `randread` (4 KiB), `randwrite` (4 KiB), `seqwrite` (1 MiB, in four
//! 256 KiB segments as a guest's page-merged request would come).

#[allow(dead_code)]
#[path = "../tests/common/vhost_guest.rs"]
mod vhost_guest;

use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_guest::*;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 256;
/// Descriptors each request slot owns (header, up to 6 data, status).
const STRIDE: u16 = 8;
const SEG: u64 = 256 << 10;
const HDRS: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const SLOT_DATA: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Job {
    RandRead,
    RandWrite,
    SeqWrite,
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: vhost_load SOCKET randread|randwrite|seqwrite DEPTH SECS SIZE_MIB");
        std::process::exit(2);
    }
    let job = match a[2].as_str() {
        "randread" => Job::RandRead,
        "randwrite" => Job::RandWrite,
        "seqwrite" => Job::SeqWrite,
        j => {
            eprintln!("vhost_load: unknown job {j}");
            std::process::exit(2);
        }
    };
    let num = |i: usize, what: &str| -> u64 {
        a[i].parse().unwrap_or_else(|_| {
            eprintln!("vhost_load: {what} must be a number, not {}", a[i]);
            std::process::exit(2)
        })
    };
    let depth = num(3, "DEPTH").clamp(1, u64::from(QSIZE / STRIDE)) as u16;
    let secs = num(4, "SECS");
    let size = num(5, "SIZE_MIB") << 20;
    run(
        Path::new(&a[1]),
        job,
        depth,
        Duration::from_secs(secs),
        size,
    );
}

fn run(sock: &Path, job: Job, depth: u16, secs: Duration, size: u64) {
    let mem = memfd_memory((DATA + SLOT_DATA * u64::from(depth)) as usize);
    let mut n = connect_frontend(
        sock,
        1,
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
        // What a Linux guest takes when offered: event index, flush, block
        // size, segment limit.
        VIRTIO_RING_F_EVENT_IDX | (1 << 9) | (1 << 6) | (1 << 2),
        VhostUserProtocolFeatures::MQ,
        &mem,
    );
    let event_idx = n.features & VIRTIO_RING_F_EVENT_IDX != 0;
    let ring = Ring {
        size: QSIZE,
        desc: 0,
        avail: 0x1000 * u64::from(QSIZE) / 64,
        used: 0x2000 * u64::from(QSIZE) / 64,
    };
    let vring = Vring::setup(&mut n.frontend, &mem, 0, ring);
    // Data that is not zeros (a backend may treat zeros specially), the
    // same for every write.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let fill: Vec<u8> = (0..SLOT_DATA)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for s in 0..u64::from(depth) {
        mem.write_slice(&fill, GuestAddress(DATA + s * SLOT_DATA))
            .unwrap();
    }
    let (len, kind, device_writes) = match job {
        Job::RandRead => (4096u64, T_IN, true),
        Job::RandWrite => (4096, T_OUT, false),
        Job::SeqWrite => (1 << 20, T_OUT, false),
    };
    let mut seq_next = 0u64;
    let mut next_offset = || match job {
        Job::SeqWrite => {
            let o = seq_next;
            seq_next = (seq_next + len) % (size / len * len);
            o
        }
        _ => {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % (size / len) * len
        }
    };
    let put = |slot: u16, offset: u64, avail: &mut u16| {
        let d = slot * STRIDE;
        let hdr = HDRS + 16 * u64::from(slot);
        let status = STATUS + u64::from(slot);
        write_header(&mem, hdr, kind, offset / 512);
        mem.write_obj(0xAAu8, GuestAddress(status)).unwrap();
        ring.write_desc(&mem, d, hdr, 16, F_NEXT, d + 1);
        let segs = len.div_ceil(SEG) as u16;
        for i in 0..segs {
            let at = DATA + u64::from(slot) * SLOT_DATA + u64::from(i) * SEG;
            let w = if device_writes { F_WRITE } else { 0 };
            ring.write_desc(
                &mem,
                d + 1 + i,
                at,
                len.min(SEG) as u32,
                w | F_NEXT,
                d + 2 + i,
            );
        }
        ring.write_desc(&mem, d + 1 + segs, status, 1, F_WRITE, 0);
        ring.put_avail(&mem, *avail, d);
        *avail = avail.wrapping_add(1);
    };
    let mut avail = 0u16;
    let mut used_seen = 0u16;
    let mut started = vec![Instant::now(); usize::from(depth)];
    for s in 0..depth {
        put(s, next_offset(), &mut avail);
        started[usize::from(s)] = Instant::now();
    }
    if event_idx {
        ring.set_used_event(&mem, 0);
    }
    ring.publish(&mem, avail);
    vring.kick.write(1).unwrap();
    let t0 = Instant::now();
    let (mut ops, mut errors, mut lat) = (0u64, 0u64, Duration::ZERO);
    let mut in_flight = depth;
    let mut last_progress = Instant::now();
    while in_flight > 0 {
        let used = ring.used_idx(&mem);
        if used == used_seen {
            // Wait for the backend's call (or poll again after a while: a
            // call may have come before the used index was read).
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&vring.call),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, its count, a timeout in ms.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = vring.call.read();
            if last_progress.elapsed() > Duration::from_secs(30) {
                eprintln!("vhost_load: no completion for 30 s ({in_flight} in flight)");
                std::process::exit(1);
            }
            continue;
        }
        last_progress = Instant::now();
        let stop = t0.elapsed() >= secs;
        while used_seen != used {
            let (head, _) = ring.used_elem(&mem, used_seen);
            used_seen = used_seen.wrapping_add(1);
            let slot = (head / u32::from(STRIDE)) as u16;
            if slot >= depth {
                eprintln!("vhost_load: backend returned unknown head {head}");
                std::process::exit(1);
            }
            let st: u8 = mem
                .read_obj(GuestAddress(STATUS + u64::from(slot)))
                .unwrap();
            if st != S_OK {
                errors += 1;
            }
            ops += 1;
            lat += started[usize::from(slot)].elapsed();
            if stop {
                in_flight -= 1;
            } else {
                put(slot, next_offset(), &mut avail);
                started[usize::from(slot)] = Instant::now();
            }
        }
        if event_idx {
            ring.set_used_event(&mem, used_seen);
        }
        if !stop {
            ring.publish(&mem, avail);
            vring.kick.write(1).unwrap();
        }
    }
    let el = t0.elapsed().as_secs_f64();
    println!(
        "VHOST-LOAD job={} depth={depth} ops={ops} secs={el:.2} iops={:.0} mib_s={:.1} lat_us={:.0} errors={errors}",
        a_job(job),
        ops as f64 / el,
        (ops * len) as f64 / el / f64::from(1 << 20),
        lat.as_secs_f64() * 1e6 / ops.max(1) as f64,
    );
    if errors > 0 {
        std::process::exit(1);
    }
}

fn a_job(j: Job) -> &'static str {
    match j {
        Job::RandRead => "randread",
        Job::RandWrite => "randwrite",
        Job::SeqWrite => "seqwrite",
    }
}
