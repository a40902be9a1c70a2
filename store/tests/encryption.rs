//! Encryption at rest, with real daemons replicating over mutual TLS: the
//! writer encrypts before replicating, so a pattern written never reaches
//! any replica's disk in the clear, yet reads back through the writer, a
//! rebuild, a scrub, a clone, an online rekey under load and a rekey
//! interrupted by kill -9.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kiln_store::crypt::VolumeKey;
use kiln_store::proto::{Request, Response, VolumeStatus};
use kiln_store::{VolumeClient, VolumeIo};

const MIB: u64 = 1 << 20;

/// A recognisable plaintext: `tag` repeated, with the offset mixed in every
/// 64 bytes so that no two blocks are alike.
fn marked(tag: &[u8; 16], len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = seed;
    while v.len() < len {
        v.extend_from_slice(tag);
        v.extend_from_slice(tag);
        v.extend_from_slice(tag);
        v.extend_from_slice(&i.to_le_bytes());
        v.extend_from_slice(&(!i).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// Writes `key` to a 0600 file under `dir`.
fn key_file(dir: &Path, name: &str, key: &VolumeKey) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key.expose()).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Every regular file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files(&e.path(), out);
        } else if t.is_file() && !t.is_socket() {
            out.push(e.path());
        }
    }
}

/// Does `needle` occur in any file under `dir`? Sparse files are read
/// only where they hold data (SEEK_DATA / SEEK_HOLE).
fn on_disk(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::io::AsRawFd;
    let mut all = Vec::new();
    files(dir, &mut all);
    let mut hits = Vec::new();
    for p in all {
        let Ok(f) = std::fs::File::open(&p) else {
            continue;
        };
        let len = f.metadata().unwrap().len() as i64;
        let fd = f.as_raw_fd();
        let mut pos = 0i64;
        let mut found = false;
        while pos < len && !found {
            // SAFETY: lseek on a file descriptor we own.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { len } else { hole };
            let mut buf = vec![0u8; (end - data) as usize];
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut buf, data as u64).unwrap();
            found = buf.windows(needle.len()).any(|w| w == needle);
            pos = end;
        }
        if found {
            hits.push(p);
        }
    }
    hits
}

fn status(n: &Node, vol: &str) -> VolumeStatus {
    n.status(vol)
}

fn attach(
    n: &Node,
    vol: &str,
    key: Option<&VolumeKey>,
    next: Option<&VolumeKey>,
) -> kiln_store::Result<VolumeStatus> {
    match n.call(Request::VolAttach {
        name: vol.into(),
        force: false,
        key: key.cloned(),
        next_key: next.cloned(),
    })? {
        Response::Status(s) => Ok(s),
        r => panic!("{r:?}"),
    }
}

fn detach(n: &Node, vol: &str) {
    n.call(Request::VolDetach { name: vol.into() }).unwrap();
}

fn read_all(n: &Node, vol: &str, size: u64) -> Vec<u8> {
    let v = VolumeClient::open(&n.socket, vol).unwrap();
    let mut buf = vec![0u8; size as usize];
    v.read_at(&mut buf, 0).unwrap();
    buf
}

fn wait_in_sync(n: &Node, vol: &str) {
    wait_until("every replica in sync", Duration::from_secs(60), || {
        status(n, vol).replicas.iter().all(|r| r.state == "in-sync")
    });
}

#[test]
fn a_pattern_written_is_nowhere_on_disk_yet_reads_back_after_a_rebuild_and_a_scrub() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2, n3, n4) = (
        Node::new(t.path(), "n1", 2),
        Node::new(t.path(), "n2", 1),
        Node::new(t.path(), "n3", 1),
        Node::new(t.path(), "n4", 1),
    );
    let key = VolumeKey::random().unwrap();
    let kf = key_file(t.path(), "vol.key", &key);
    let size = 8 * MIB;
    let reps = [n1.replica_arg(), n2.replica_arg(), n3.replica_arg()];
    let out = n1.cli_ok(&[
        "create",
        "vol",
        "--size",
        "8M",
        "--replica",
        &reps[0],
        "--replica",
        &reps[1],
        "--replica",
        &reps[2],
        "--key-file",
        kf.to_str().unwrap(),
    ]);
    assert!(out.contains(&key.check()), "{out}");
    // A plaintext volume on the same disks, as the scan's control.
    n1.create_volume("plain", "4M", &[&n1, &n2, &n3]);
    let st = status(&n1, "vol");
    assert!(st.encrypted && st.key_check.as_deref() == Some(key.check().as_str()));
    assert!(!status(&n1, "plain").encrypted);
    for n in [&n1, &n2, &n3] {
        let c = n
            .info("vol")
            .crypt
            .expect("every replica records the key check");
        assert_eq!(c.key_check, key.check());
    }

    let secret = *b"KILN-SECRET-DATA";
    let clear = *b"KILN-PLAIN-DATA!";
    let mut model = vec![0u8; size as usize];
    let v = VolumeClient::open(&n1.socket, "vol").unwrap();
    let a = marked(&secret, 3 * MIB as usize, 0);
    v.write_at(&a, MIB).unwrap();
    model[MIB as usize..MIB as usize + a.len()].copy_from_slice(&a);
    // Sub-block writes are read-modify-written under the writer's lock.
    for (off, len) in [
        (5000u64, 3000usize),
        (6 * MIB + 4095, 2),
        (6 * MIB + 100, 9000),
    ] {
        let d = marked(&secret, len, off);
        v.write_at(&d, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    v.flush().unwrap();
    let p = VolumeClient::open(&n1.socket, "plain").unwrap();
    p.write_at(&marked(&clear, MIB as usize, 0), 0).unwrap();
    p.flush().unwrap();
    assert!(
        read_all(&n1, "vol", size) == model,
        "read back through the writer"
    );

    let needle = &secret[..];
    for n in [&n1, &n2, &n3] {
        assert!(
            !on_disk(&n.dir, &clear).is_empty(),
            "the scan finds plaintext on {} (control)",
            n.id
        );
        let hits = on_disk(&n.dir, needle);
        assert!(
            hits.is_empty(),
            "plaintext of the encrypted volume on {}: {hits:?}",
            n.id
        );
        // What a replica holds and serves is ciphertext.
        let raw = n.replica_read_all("vol", size);
        assert!(raw[MIB as usize..2 * MIB as usize] != model[MIB as usize..2 * MIB as usize]);
    }

    // Scrub and the replica comparison work on ciphertext, without keys.
    let out = n1.cli_ok(&["--json", "scrub", "vol"]);
    let r: kiln_store::proto::ScrubReport = serde_json::from_str(&out).unwrap();
    assert!(r.bad_blocks.is_empty() && r.unrepaired == 0, "{r:?}");
    assert!(r.compared_regions > 0 && r.diverged_regions == 0, "{r:?}");

    // Rebuild onto n4, dropping n3; then read through n4 as the writer.
    n1.call(Request::VolRebuild {
        name: "vol".into(),
        add: kiln_store::meta::ReplicaAddr {
            node: "n4".into(),
            addr: n4.addr(),
        },
        remove: Some("n3".into()),
    })
    .unwrap();
    wait_in_sync(&n1, "vol");
    assert_eq!(n4.info("vol").crypt.unwrap().key_check, key.check());
    assert!(
        on_disk(&n4.dir, needle).is_empty(),
        "plaintext on the rebuilt replica"
    );
    detach(&n1, "vol");
    let e = attach(&n4, "vol", None, None).unwrap_err();
    assert!(e.to_string().contains("is encrypted"), "{e}");
    let st = attach(&n4, "vol", Some(&key), None).unwrap();
    assert!(st.attached && st.encrypted);
    assert!(
        read_all(&n4, "vol", size) == model,
        "read back after the rebuild"
    );
    let logs = [&n1, &n2, &n3, &n4].map(|n| n.log()).concat();
    assert!(!logs.contains(&hex(key.expose())), "a key in a log");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn wrong_missing_or_unneeded_keys_are_refused_and_nothing_is_attached() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2) = (Node::new(t.path(), "n1", 1), Node::new(t.path(), "n2", 1));
    let key = VolumeKey::random().unwrap();
    let other = VolumeKey::random().unwrap();
    let kf = key_file(t.path(), "k", &key);
    let reps = [n1.replica_arg(), n2.replica_arg()];
    n1.cli_ok(&[
        "create",
        "enc",
        "--size",
        "1M",
        "--replica",
        &reps[0],
        "--replica",
        &reps[1],
        "--key-file",
        kf.to_str().unwrap(),
    ]);
    n1.create_volume("plain", "1M", &[&n1, &n2]);
    let v = VolumeClient::open(&n1.socket, "enc").unwrap();
    v.write_at(&[7u8; 4096], 0).unwrap();

    // Attached already: a wrong key is refused there too.
    let e = attach(&n1, "enc", Some(&other), None).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    let e = attach(&n1, "plain", Some(&key), None).unwrap_err();
    assert!(e.to_string().contains("not encrypted"), "{e}");
    // Rekeys: not of a plaintext volume, not to the same key.
    for (vol, k, want) in [
        ("plain", &key, "not encrypted"),
        ("enc", &key, "current key"),
    ] {
        let e = n1
            .call(Request::VolRekey {
                name: vol.into(),
                key: k.clone(),
            })
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(status(&n1, "enc").rekey.is_none());

    detach(&n1, "enc");
    detach(&n1, "plain");
    let epochs = |vol: &str| [n1.info(vol).epoch, n2.info(vol).epoch];
    let (enc0, plain0) = (epochs("enc"), epochs("plain"));
    for (vol, k, want) in [
        ("enc", None, "is encrypted"),
        ("enc", Some(&other), "wrong key"),
        ("plain", Some(&key), "not encrypted"),
    ] {
        let e = attach(&n1, vol, k, None).unwrap_err();
        assert!(e.to_string().contains(want), "{vol}: {e}");
        assert!(!status(&n1, vol).attached, "{vol} attached after a refusal");
        assert!(VolumeClient::open(&n1.socket, vol)
            .unwrap()
            .read_at(&mut [0; 4096], 0)
            .is_err());
    }
    // Nothing changed: no epoch was raised (no writer was fenced).
    assert_eq!(epochs("enc"), enc0);
    assert_eq!(epochs("plain"), plain0);

    // The CLI takes keys from 0600 files of exactly 64 bytes only.
    let loose = t.path().join("loose");
    std::fs::write(&loose, key.expose()).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = n1.cli(&["attach", "enc", "--key-file", loose.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));
    let short = t.path().join("short");
    std::fs::write(&short, &key.expose()[..32]).unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!n1
        .cli(&["attach", "enc", "--key-file", short.to_str().unwrap()])
        .status
        .success());
    assert!(!status(&n1, "enc").attached);

    // The right key attaches, and the data reads back.
    let out = n1.cli_ok(&["attach", "enc", "--key-file", kf.to_str().unwrap()]);
    assert!(
        out.contains(&key.check()) && !out.contains(&hex(key.expose())),
        "{out}"
    );
    assert_eq!(epochs("enc"), [enc0[0] + 1, enc0[1] + 1]);
    let mut b = vec![0u8; 4096];
    VolumeClient::open(&n1.socket, "enc")
        .unwrap()
        .read_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, vec![7u8; 4096]);
    // A never-written block reads as zeros.
    VolumeClient::open(&n1.socket, "enc")
        .unwrap()
        .read_at(&mut b, 8192)
        .unwrap();
    assert_eq!(b, vec![0u8; 4096]);
}

#[test]
fn a_clone_reads_back_with_its_parents_key_and_snapshots_stop_a_rekey() {
    let t = tempfile::tempdir().unwrap();
    let (n1, n2) = (Node::new(t.path(), "n1", 1), Node::new(t.path(), "n2", 1));
    let key = VolumeKey::random().unwrap();
    n1.call(Request::VolCreate {
        name: "base".into(),
        size: 4 * MIB,
        replicas: [&n1, &n2]
            .iter()
            .map(|n| kiln_store::meta::ReplicaAddr {
                node: n.id.clone(),
                addr: n.addr(),
            })
            .collect(),
        key: Some(key.clone()),
    })
    .unwrap();
    let data = pattern(5, 4 * MIB as usize);
    let v = VolumeClient::open(&n1.socket, "base").unwrap();
    v.write_at(&data, 0).unwrap();
    n1.cli_ok(&["snapshot", "base", "s1"]);
    // Rekeying would leave the snapshot under the old key: refused.
    let e = n1
        .call(Request::VolRekey {
            name: "base".into(),
            key: VolumeKey::random().unwrap(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("snapshots"), "{e}");
    v.write_at(&[1u8; 4096], 0).unwrap();
    n1.cli_ok(&["clone", "base", "s1", "copy"]);
    let st = status(&n1, "copy");
    assert!(st.attached && st.encrypted);
    assert_eq!(st.key_check.as_deref(), Some(key.check().as_str()));
    assert!(
        read_all(&n1, "copy", 4 * MIB) == data,
        "the clone reads the snapshot"
    );
    detach(&n1, "copy");
    assert!(attach(&n1, "copy", Some(&VolumeKey::random().unwrap()), None).is_err());
    attach(&n1, "copy", Some(&key), None).unwrap();
    assert!(read_all(&n1, "copy", 4 * MIB) == data);

    // Without the snapshot the parent is rekeyed (with the CLI); the clone,
    // which shared its extents, keeps the old key and its data.
    let new = VolumeKey::random().unwrap();
    let kf = key_file(t.path(), "new", &new);
    let o = n1.cli(&["rekey", "base", "--key-file", kf.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("snapshots"));
    n1.cli_ok(&["snapshot", "base", "s1", "--delete"]);
    let out = n1.cli_ok(&["rekey", "base", "--key-file", kf.to_str().unwrap()]);
    assert!(out.contains(&new.check()), "{out}");
    let mut base = data.clone();
    base[..4096].fill(1);
    assert!(read_all(&n1, "base", 4 * MIB) == base);
    assert!(read_all(&n1, "copy", 4 * MIB) == data, "the clone changed");
    assert_eq!(
        status(&n1, "copy").key_check.as_deref(),
        Some(key.check().as_str())
    );
    detach(&n1, "base");
    assert!(attach(&n1, "base", Some(&key), None).is_err());
    attach(&n1, "base", Some(&new), None).unwrap();
    assert!(read_all(&n1, "base", 4 * MIB) == base);
}

/// Fills `vol` (of `size`) with a pattern, leaving one region a hole.
fn fill(n: &Node, vol: &str, size: u64) -> Vec<u8> {
    let v = VolumeClient::open(&n.socket, vol).unwrap();
    let mut model = pattern(9, size as usize);
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    for off in (0..size).step_by(MIB as usize) {
        if off != 2 * MIB {
            v.write_at(&model[off as usize..(off + MIB) as usize], off)
                .unwrap();
        }
    }
    v.flush().unwrap();
    model
}

#[test]
fn an_online_rekey_under_a_concurrent_writer_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let nodes = [
        Node::new(t.path(), "n1", 1),
        Node::new(t.path(), "n2", 1),
        Node::new(t.path(), "n3", 1),
    ];
    let (old, new) = (VolumeKey::random().unwrap(), VolumeKey::random().unwrap());
    // Large enough that a release build's rekey spans many guest writes.
    let size = 96 * MIB;
    let reps: Vec<String> = nodes.iter().map(|n| n.replica_arg()).collect();
    let kf = key_file(t.path(), "old", &old);
    n_create(&nodes[0], "vol", "96M", &reps, &kf);
    let model = Arc::new(Mutex::new(fill(&nodes[0], "vol", size)));

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (m, s, sock, n) = (
        model.clone(),
        stop.clone(),
        nodes[0].socket.clone(),
        acked.clone(),
    );
    let guest = std::thread::spawn(move || {
        let v = VolumeClient::open(&sock, "vol").unwrap();
        let mut rng = Rng(7);
        let mut writes = 0u64;
        while !s.load(Ordering::SeqCst) || writes < 20 {
            // Aligned and unaligned, small and up to 300 KiB.
            let len = 1 + rng.below(300_000) as usize;
            let off = rng.below(size - len as u64);
            let d = pattern(1000 + writes, len);
            v.write_at(&d, off).unwrap();
            m.lock().unwrap()[off as usize..off as usize + len].copy_from_slice(&d);
            writes += 1;
            n.store(writes, Ordering::SeqCst);
        }
        writes
    });
    wait_until("the guest writing", Duration::from_secs(10), || {
        acked.load(Ordering::SeqCst) > 0
    });
    let mut frames = Vec::new();
    let kf_new = key_file(t.path(), "new", &new);
    let before = acked.load(Ordering::SeqCst);
    let r = nodes[0]
        .client()
        .call_with_progress(
            &Request::VolRekey {
                name: "vol".into(),
                key: VolumeKey::from_file(&kf_new).unwrap(),
            },
            &mut |p| frames.push((p.done, p.total)),
        )
        .unwrap();
    let during = acked.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    let writes = guest.join().unwrap();
    assert!(writes >= 20);
    assert!(
        // How many depends on the machine's speed; one proves the guest
        // was served while the rekey ran (five failed once on a fast CI run).
        during >= 1,
        "no write acknowledged during the rekey"
    );
    let Response::Status(st) = r else {
        panic!("{r:?}")
    };
    assert_eq!(st.key_check.as_deref(), Some(new.check().as_str()));
    assert!(st.rekey.is_none());
    assert!(!frames.is_empty(), "no progress reported");
    assert!(
        frames.iter().all(|(d, t)| d <= t && *t == size),
        "{frames:?}"
    );
    assert!(frames.windows(2).all(|w| w[0].0 <= w[1].0), "{frames:?}");

    let model = model.lock().unwrap().clone();
    assert!(
        read_all(&nodes[0], "vol", size) == model,
        "data lost in the rekey"
    );
    for n in &nodes {
        let c = n.info("vol").crypt.unwrap();
        assert_eq!(c.key_check, new.check(), "{}", n.id);
        assert!(c.rekey.is_none());
    }
    // The old key is forgotten; the new one reads everything.
    detach(&nodes[0], "vol");
    let e = attach(&nodes[0], "vol", Some(&old), None).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    attach(&nodes[0], "vol", Some(&new), None).unwrap();
    assert!(read_all(&nodes[0], "vol", size) == model);
    // Every allocated block is under the new key: decrypting what a
    // replica holds with it gives the model.
    let raw = nodes[1].replica_read_all("vol", size);
    let mut dec = raw.clone();
    kiln_store::crypt::BlockCipher::new(&new)
        .unwrap()
        .decrypt(&mut dec, 0)
        .unwrap();
    assert!(dec == model, "a block not under the new key");
}

fn n_create(n: &Node, vol: &str, size: &str, reps: &[String], kf: &Path) {
    let mut args = vec![
        "create",
        vol,
        "--size",
        size,
        "--key-file",
        kf.to_str().unwrap(),
    ];
    for r in reps {
        args.push("--replica");
        args.push(r);
    }
    n.cli_ok(&args);
}

#[test]
fn a_rekey_interrupted_by_kill_9_resumes_when_attached_with_both_keys() {
    let t = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(t.path(), "n1", 1);
    let nodes = [Node::new(t.path(), "n2", 1), Node::new(t.path(), "n3", 1)];
    let (old, new) = (VolumeKey::random().unwrap(), VolumeKey::random().unwrap());
    let size = 32 * MIB;
    let mut reps = vec![n1.replica_arg()];
    reps.extend(nodes.iter().map(|n| n.replica_arg()));
    let kf = key_file(t.path(), "old", &old);
    n_create(&n1, "vol", "32M", &reps, &kf);
    let model = fill(&n1, "vol", size);
    // Slow syncs on a peer, so that the rekey takes a while.
    std::fs::write(nodes[0].faults().join("slow-sync-ms"), "40").unwrap();
    let (sock, key) = (n1.socket.clone(), new.clone());
    let rekey = std::thread::spawn(move || {
        kiln_store::Client::connect(&sock)
            .unwrap()
            .call(&Request::VolRekey {
                name: "vol".into(),
                key,
            })
            .is_ok()
    });
    wait_until("a quarter of the rekey", Duration::from_secs(60), || {
        status(&n1, "vol").rekey.is_some_and(|r| r.done >= size / 4)
    });
    n1.kill9();
    assert!(!rekey.join().unwrap(), "the rekey outlived its daemon");
    std::fs::remove_file(nodes[0].faults().join("slow-sync-ms")).unwrap();
    n1.start();

    let st = status(&n1, "vol");
    let r = st.rekey.expect("the interrupted rekey is on record");
    assert_eq!(r.next_key_check, new.check());
    assert!(r.done < size);
    // One key alone is not enough: half the volume is under each.
    for (k, n, want) in [
        (Some(&old), None, "interrupted"),
        (Some(&new), None, "wrong key"),
        (None, None, "is encrypted"),
        (Some(&new), Some(&old), "wrong key"),
    ] {
        let e = attach(&n1, "vol", k, n).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    attach(&n1, "vol", Some(&old), Some(&new)).unwrap();
    // The record named the region being re-encrypted when the daemon died
    // (from its first step to the next one's, there always is one), and
    // attach settled it block by block.
    assert!(
        n1.log()
            .contains("finishing the region an interrupted rekey was re-encrypting"),
        "{}",
        n1.log()
    );
    wait_until("the resumed rekey", Duration::from_secs(120), || {
        status(&n1, "vol").rekey.is_none()
    });
    assert_eq!(
        status(&n1, "vol").key_check.as_deref(),
        Some(new.check().as_str())
    );
    assert!(
        read_all(&n1, "vol", size) == model,
        "data lost across the crash"
    );
    detach(&n1, "vol");
    attach(&n1, "vol", Some(&new), None).unwrap();
    assert!(read_all(&n1, "vol", size) == model);
    for n in nodes.iter().chain([&n1]) {
        assert_eq!(n.info("vol").crypt.unwrap().key_check, new.check());
    }
}

#[test]
fn a_replica_that_missed_a_rekey_is_attached_with_the_new_key_and_catches_up() {
    let t = tempfile::tempdir().unwrap();
    let n1 = Node::new(t.path(), "n1", 1);
    let n2 = Node::new(t.path(), "n2", 1);
    let mut n3 = Node::new(t.path(), "n3", 1);
    let (old, new) = (VolumeKey::random().unwrap(), VolumeKey::random().unwrap());
    let size = 4 * MIB;
    let reps = [n1.replica_arg(), n2.replica_arg(), n3.replica_arg()];
    let kf = key_file(t.path(), "old", &old);
    n_create(&n1, "vol", "4M", &reps, &kf);
    let model = fill(&n1, "vol", size);
    // n3 is down for the whole rekey: it keeps the old key's check.
    n3.kill9();
    n1.call(Request::VolRekey {
        name: "vol".into(),
        key: new.clone(),
    })
    .unwrap();
    assert_eq!(
        status(&n1, "vol").key_check.as_deref(),
        Some(new.check().as_str())
    );
    detach(&n1, "vol");
    n3.start();
    assert_eq!(n3.info("vol").crypt.unwrap().key_check, old.check());
    // Attached on n3, whose own replica is stale: the current replicas'
    // record decides, so the new key is the one.
    let e = attach(&n3, "vol", Some(&old), None).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    attach(&n3, "vol", Some(&new), None).unwrap();
    assert!(read_all(&n3, "vol", size) == model);
    wait_in_sync(&n3, "vol");
    assert_eq!(n3.info("vol").crypt.unwrap().key_check, new.check());
    assert!(n3.replica_read_all("vol", size) == n1.replica_read_all("vol", size));
}
