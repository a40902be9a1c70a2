//! Migrations that fail: the source VM runs on, the destination restores nothing.

use super::*;

/// What a scripted destination does after the handshake.
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// Reads Hello and closes.
    CloseInHello,
    /// Accepts, reads a few RAM frames and closes.
    CloseMidRam,
    /// Reads everything up to Complete and closes.
    CloseBeforeRestored,
    /// Reads everything up to Complete and answers Abort.
    AbortBeforeRestored,
    /// Reads everything up to Complete and never answers.
    SilentBeforeRestored,
    /// Says Restored, reads Commit and answers Abort (did not run it).
    AbortAfterCommit,
    /// Says Restored, reads Commit and closes (ran it, or not).
    CloseAfterCommit,
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
        if let Misbehave::AbortAfterCommit | Misbehave::CloseAfterCommit = how {
            protocol::send(&mut c, &Message::Restored).unwrap();
            assert_eq!(protocol::recv(&mut c).unwrap(), Message::Commit);
        }
        match how {
            Misbehave::AbortBeforeRestored | Misbehave::AbortAfterCommit => protocol::send(
                &mut c,
                &Message::Abort {
                    reason: "out of memory here".into(),
                },
            )
            .unwrap(),
            Misbehave::SilentBeforeRestored => {
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
        Misbehave::CloseBeforeRestored,
        Misbehave::AbortBeforeRestored,
        Misbehave::SilentBeforeRestored,
        Misbehave::AbortAfterCommit,
    ] {
        let dir = TempDir::new("fail");
        let listener = Listener::bind(&unix_addr(&dir), &quick_transport()).unwrap();
        let addr = listener.local_address();
        let dest = scripted_destination(listener, how);
        let ram = SharedRam::new(size);
        fill(&ram, 1); // all data: round 0 is big
        let mut source = FakeSource::new(ram, size);
        let cfg = SendConfig {
            restore_timeout: Duration::from_millis(300),
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
            Misbehave::CloseBeforeRestored => {
                assert_eq!(e.stage, Stage::AwaitRestored, "{msg}");
                assert!(msg.contains("closed"), "{msg}");
            }
            Misbehave::AbortBeforeRestored => {
                assert_eq!(e.stage, Stage::AwaitRestored, "{msg}");
                assert!(msg.contains("out of memory here"), "{msg}");
            }
            Misbehave::SilentBeforeRestored => {
                assert_eq!(e.stage, Stage::AwaitRestored, "{msg}");
                assert!(msg.contains("no answer within"), "{msg}");
            }
            Misbehave::AbortAfterCommit => {
                assert_eq!(e.stage, Stage::AwaitResumed, "{msg}");
                assert!(msg.contains("out of memory here"), "{msg}");
            }
            Misbehave::CloseAfterCommit => unreachable!(),
        }
        assert!(!e.in_doubt, "{how:?}: {msg}");
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
fn a_destination_lost_after_commit_leaves_the_source_paused_in_doubt() {
    let size = 4 * MIB;
    let dir = TempDir::new("doubt");
    let listener = Listener::bind(&unix_addr(&dir), &quick_transport()).unwrap();
    let addr = listener.local_address();
    let dest = scripted_destination(listener, Misbehave::CloseAfterCommit);
    let mut source = FakeSource::new(SharedRam::new(size), size);
    let progress = Progress::default();
    let e = migrate(&mut source, &addr, &send_cfg(), &progress).unwrap_err();
    dest.join().unwrap();
    assert_eq!(e.stage, Stage::AwaitResumed, "{e}");
    assert!(e.in_doubt, "{e}");
    assert!(
        e.to_string().contains("may be running on the destination"),
        "{e}"
    );
    // Never resumed: the VM may run there.
    assert_eq!((source.calls.pause, source.calls.resume), (1, 0));
    assert!(!source.running());
    assert_eq!(source.calls.stop_log, 1);
    assert_eq!(progress.snapshot().phase, Phase::Failed);
}

/// What a migration that fails at both ends leaves: the source's error,
/// the destination's target and error.
struct Failed {
    e: MigrationError,
    target: FakeTarget,
    de: MigrationError,
}

/// Migrates `source` to a real receiver for `target` on a Unix socket (a
/// fresh directory named after `name`); both ends must fail.
fn migrate_failing(
    name: &str,
    source: &mut FakeSource,
    target: FakeTarget,
    progress: &Progress,
) -> Failed {
    let (_dir, addr, dest) = spawn_unix_receiver(name, target);
    let e = migrate(source, &addr, &send_cfg(), progress).unwrap_err();
    let (target, r) = dest.join().unwrap();
    Failed {
        e,
        target,
        de: r.unwrap_err(),
    }
}

#[test]
fn a_destination_that_cannot_start_the_vm_lets_the_source_resume() {
    let size = 4 * MIB;
    let mut target = FakeTarget::new(size);
    target.fail_run = true;
    let mut source = FakeSource::new(SharedRam::new(size), size);
    let Failed { e, target, de } =
        migrate_failing("run", &mut source, target, &Progress::default());
    assert_eq!(e.stage, Stage::AwaitResumed, "{e}");
    assert!(!e.in_doubt);
    assert!(e.to_string().contains("would not start"), "{e}");
    assert_eq!(source.calls.resume, 1);
    assert!(source.running());
    assert_eq!(de.stage, Stage::Run);
    assert!(!target.running);
}

#[test]
fn a_source_lost_before_commit_leaves_the_destination_not_running() {
    let size = 4 * MIB;
    let (_dir, addr, dest) = spawn_unix_receiver("nocommit", FakeTarget::new(size));
    let mut c = connect_accepted(&addr, size);
    protocol::send(&mut c, &Message::State(b"state".to_vec())).unwrap();
    protocol::send(&mut c, &Message::Complete).unwrap();
    assert_eq!(protocol::recv(&mut c).unwrap(), Message::Restored);
    drop(c);
    let (target, r) = dest.join().unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.stage, Stage::AwaitCommit, "{e}");
    assert_eq!(target.restored.as_deref(), Some(&b"state"[..]));
    assert!(!target.running, "no Commit, no run");
}

#[test]
fn a_refusing_destination_says_why() {
    let mut source = FakeSource::new(SharedRam::new(4 * MIB), 4 * MIB);
    let target = FakeTarget::new(8 * MIB);
    let Failed { e, target, de } =
        migrate_failing("refuse", &mut source, target, &Progress::default());
    assert_eq!(e.stage, Stage::Hello);
    assert!(matches!(e.kind, ErrorKind::Refused(_)), "{e}");
    assert!(e.to_string().contains("RAM size differs"), "{e}");
    assert_eq!(source.calls, Calls::default());
    assert_eq!(de.stage, Stage::Hello);
    assert!(target.restored.is_none());

    // Devices: same kinds, different ids.
    let mut other = FakeTarget::new(4 * MIB);
    other.machine.devices[1].id = "eth1".into();
    let mut source = FakeSource::new(SharedRam::new(4 * MIB), 4 * MIB);
    let f = migrate_failing("refuse2", &mut source, other, &Progress::default());
    assert!(f.e.to_string().contains("devices differ"), "{}", f.e);
}

#[test]
fn a_failed_restore_resumes_the_source() {
    let size = 4 * MIB;
    let mut target = FakeTarget::new(size);
    target.fail_restore = true;
    let mut source = FakeSource::new(SharedRam::new(size), size);
    let Failed { e, de, .. } =
        migrate_failing("restore", &mut source, target, &Progress::default());
    assert_eq!(e.stage, Stage::AwaitRestored);
    assert!(e.to_string().contains("no such disk"), "{e}");
    assert_eq!(source.calls.resume, 1);
    assert!(source.running());
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
    let (_dir, addr, dest) = spawn_unix_receiver("vanish", FakeTarget::new(size));
    let mut c = connect_accepted(&addr, size);
    let pages = Message::Pages {
        runs: one_run(5, 1),
        data: vec![9; PAGE_SIZE],
    };
    protocol::send(&mut c, &pages).unwrap();
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
    let (_dir, addr, dest) = spawn_unix_receiver("past", FakeTarget::new(size));
    let mut c = connect_accepted(&addr, size);
    let past_end = Message::ZeroPages {
        runs: one_run(1023, 2),
    };
    protocol::send(&mut c, &past_end).unwrap();
    // The destination says why before closing.
    match protocol::recv(&mut c).unwrap() {
        Message::Abort { reason } => assert!(reason.contains("past the end of RAM"), "{reason}"),
        m => panic!("{m:?}"),
    }
    let e = dest.join().unwrap().1.unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Invalid(_)), "{e}");
}

#[test]
fn a_cancelled_migration_leaves_the_vm_running() {
    let size = 8 * MIB;
    let mut source = FakeSource::new(SharedRam::new(size), size);
    let progress = Progress::default();
    progress.cancel();
    let Failed { e, target, de } =
        migrate_failing("cancel", &mut source, FakeTarget::new(size), &progress);
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert_eq!(e.stage, Stage::Memory { round: 0 });
    assert_eq!(source.calls.pause, 0);
    assert_eq!(source.calls.stop_log, 1);
    assert!(source.running());
    assert!(matches!(de.kind, ErrorKind::Aborted(_)), "{de}");
    assert!(de.to_string().contains("cancelled"), "{de}");
    assert!(target.restored.is_none());
}

#[test]
fn a_failed_pause_resumes_the_source_and_aborts_the_destination() {
    let size = 4 * MIB;
    let mut source = FakeSource::new(SharedRam::new(size), size);
    source.fail_pause = true;
    let Failed { e, target, de } = migrate_failing(
        "pause",
        &mut source,
        FakeTarget::new(size),
        &Progress::default(),
    );
    assert_eq!(e.stage, Stage::Pause, "{e}");
    assert!(e.to_string().contains("would not quiesce"), "{e}");
    assert_eq!((source.calls.pause, source.calls.resume), (1, 1));
    assert!(source.running());
    assert!(de.to_string().contains("would not quiesce"), "{de}");
    assert!(target.restored.is_none());
}

#[test]
fn another_format_version_is_refused() {
    let size = 4 * MIB;
    let (_dir, addr, dest) = spawn_unix_receiver("version", FakeTarget::new(size));
    let mut c = transport::connect(&addr, &quick_transport()).unwrap();
    protocol::send(&mut c, &hello(99, "9.9.9", size)).unwrap();
    match protocol::recv(&mut c).unwrap() {
        Message::Refuse { reason } => assert!(reason.contains("format 99"), "{reason}"),
        m => panic!("{m:?}"),
    }
    let e = dest.join().unwrap().1.unwrap_err();
    assert_eq!(e.stage, Stage::Hello);
}
