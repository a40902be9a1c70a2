//! Whole migrations that succeed.

use super::*;

#[test]
fn a_busy_guest_migrates_byte_for_byte() {
    let size = 64 * MIB;
    let pages = size / PAGE_SIZE as u64;
    let (_dir, addr, dest) = spawn_unix_receiver("busy", FakeTarget::new(size));
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
    assert!(target.running);
    assert!(received.source_told);
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
    let (_dir, addr, dest) = spawn_unix_receiver("idle", FakeTarget::new(size));
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

#[test]
fn a_dirty_set_that_never_shrinks_switches_over_anyway() {
    let size = 8 * MIB;
    let (_dir, addr, dest) = spawn_unix_receiver("churn", FakeTarget::new(size));
    let ram = SharedRam::new(size);
    fill(&ram, 7);
    let mut source = FakeSource::new(ram, size);
    source.churn = 300;
    let cfg = SendConfig {
        downtime: Duration::from_micros(1),
        stall_rounds: 2,
        ..send_cfg()
    };
    let report = migrate(&mut source, &addr, &cfg, &Progress::default()).unwrap();
    let (target, r) = dest.join().unwrap();
    r.unwrap();
    assert_eq!(report.switch_reason, SwitchReason::NotConverging);
    // Round 0, rounds 1 and 2 (300 pages each), then the paused one.
    let pages: Vec<u64> = report.rounds.iter().map(|r| r.pages).collect();
    assert_eq!(pages, vec![size / PAGE_SIZE as u64, 300, 300, 300]);
    assert!(report.estimated_downtime > cfg.downtime);
    assert!(target.ram == *source.at_pause.as_ref().unwrap());
}
