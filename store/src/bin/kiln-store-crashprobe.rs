//! `kiln-store-crashprobe`: writes a known history to a volume and, after a
//! crash (power cut or `kill -9`), checks that every acknowledged write is
//! there. Used by the power-loss test (`tests/tests/store_power_loss.rs`).
//!
//! `write` runs rounds 1, 2, …: each writes 16 chunks of 64 KiB at offsets
//! derived from the round number, then flushes, then prints
//! `KILN-ACK round=N`. Every 4 KiB block written carries its round, its block
//! number and a magic header, followed by bytes derived from both, so a
//! block read back names the round that wrote it.
//!
//! `verify --acked N` reads the whole volume. A block must hold what rounds
//! 1..=N left in it (zeros if none wrote it) or a version from a later,
//! unacknowledged round that did write it (such writes may or may not have
//! reached the disk). Anything else, and any read error on a block that an
//! acknowledged round wrote, is a failure.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln_store::{VolumeClient, VolumeIo};

const BLOCK: usize = 4096;
const CHUNK: usize = 64 << 10;
const CHUNKS_PER_ROUND: u64 = 16;
const MAGIC: &[u8; 8] = b"KILNCP01";

/// Writes rounds of checkable data to a kiln-store volume, or verifies
/// them after a crash.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The local daemon's control socket.
    #[arg(long, default_value = "/run/kiln/store.sock")]
    socket: PathBuf,
    /// The volume (at least 1 MiB; its size decides where chunks land).
    #[arg(long)]
    volume: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write rounds until killed (or until --rounds), printing an ack line
    /// after each round's flush returns.
    Write {
        /// Stop after this many rounds (default: run until killed).
        #[arg(long)]
        rounds: Option<u64>,
    },
    /// Check the volume against the history up to round --acked.
    Verify {
        /// The last round whose ack line was seen.
        #[arg(long)]
        acked: u64,
    },
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// First block of each chunk of `round` in a volume of `chunks` chunk slots.
fn round_blocks(round: u64, chunks: u64) -> Vec<u64> {
    (0..CHUNKS_PER_ROUND)
        .map(|i| splitmix(round * 1000 + i) % chunks * (CHUNK / BLOCK) as u64)
        .collect()
}

fn block_content(round: u64, block: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&round.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(MAGIC);
    let mut x = splitmix(round ^ block.rotate_left(32));
    for w in out[24..].chunks_mut(8) {
        x = splitmix(x);
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// Did `round` write `block`?
fn wrote(round: u64, block: u64, chunks: u64) -> bool {
    let per = (CHUNK / BLOCK) as u64;
    round_blocks(round, chunks)
        .iter()
        .any(|&b0| (b0..b0 + per).contains(&block))
}

fn write(v: &VolumeClient, chunks: u64, rounds: Option<u64>) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut round = 1;
    while rounds.is_none_or(|n| round <= n) {
        for b0 in round_blocks(round, chunks) {
            for (i, blk) in buf.chunks_mut(BLOCK).enumerate() {
                block_content(round, b0 + i as u64, blk);
            }
            v.write_at(&buf, b0 * BLOCK as u64)
                .with_context(|| format!("round {round}: write at block {b0}"))?;
        }
        v.flush().with_context(|| format!("round {round}: flush"))?;
        println!("KILN-ACK round={round}");
        round += 1;
    }
    Ok(())
}

fn verify(v: &VolumeClient, chunks: u64, acked: u64) -> Result<()> {
    let blocks = chunks * (CHUNK / BLOCK) as u64;
    // The state after round `acked`: the last acknowledged round per block.
    let mut last = vec![0u64; blocks as usize];
    for r in 1..=acked {
        for b0 in round_blocks(r, chunks) {
            for b in b0..b0 + (CHUNK / BLOCK) as u64 {
                last[b as usize] = r;
            }
        }
    }
    let mut want = vec![0u8; BLOCK];
    let (mut current, mut later, mut zeros) = (0u64, 0u64, 0u64);
    let mut bad = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for c in 0..chunks {
        let first = c * (CHUNK / BLOCK) as u64;
        let whole = v.read_at(&mut buf, first * BLOCK as u64);
        for i in 0..CHUNK / BLOCK {
            let b = first + i as u64;
            let blk = &mut buf[i * BLOCK..(i + 1) * BLOCK];
            if whole.is_err() {
                if let Err(e) = v.read_at(blk, b * BLOCK as u64) {
                    if last[b as usize] > 0 {
                        bad.push(format!("block {b}: read failed: {e}"));
                    }
                    continue;
                }
            }
            let round = u64::from_le_bytes(blk[..8].try_into().expect("8 bytes"));
            if blk.iter().all(|x| *x == 0) {
                if last[b as usize] == 0 {
                    zeros += 1;
                } else {
                    bad.push(format!(
                        "block {b}: zeros, but round {} wrote it and was acknowledged",
                        last[b as usize]
                    ));
                }
                continue;
            }
            block_content(round, b, &mut want);
            if blk != &want[..] {
                bad.push(format!("block {b}: not what any round wrote there"));
            } else if round == last[b as usize] {
                current += 1;
            } else if round > acked && wrote(round, b, chunks) {
                later += 1;
            } else {
                bad.push(format!(
                    "block {b}: round {round}'s data, but round {} was acknowledged after it",
                    last[b as usize]
                ));
            }
        }
    }
    println!(
        "KILN-VERIFY acked={acked} current={current} later={later} zeros={zeros} bad={}",
        bad.len()
    );
    if !bad.is_empty() {
        for b in bad.iter().take(20) {
            eprintln!("kiln-store-crashprobe: {b}");
        }
        bail!("{} blocks do not match the acknowledged history", bad.len());
    }
    Ok(())
}

fn main() {
    kiln_crash::abort_on_panic();
    let a = Args::parse();
    let run = || -> Result<()> {
        let v = VolumeClient::open(&a.socket, &a.volume)
            .with_context(|| format!("opening volume {}", a.volume))?;
        let chunks = v.size()? / CHUNK as u64;
        if chunks < 16 {
            bail!("volume {} is smaller than 1 MiB", a.volume);
        }
        match a.cmd {
            Cmd::Write { rounds } => write(&v, chunks, rounds),
            Cmd::Verify { acked } => verify(&v, chunks, acked),
        }
    };
    if let Err(e) = run() {
        eprintln!("kiln-store-crashprobe: {e:#}");
        std::process::exit(1);
    }
}
