//! A live migration's dirty log against qemu-storage-daemon
//! (libvhost-user): once the device hands the backend a log, every guest
//! page the backend writes is marked in it, and only those; once it takes
//! the log back, nothing more is marked.

use super::snapshot::written_once;
use super::*;
use crate::dirty::BackendLog;

fn drained(log: &BackendLog) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    log.drain(|addr, len| runs.push((addr, len)));
    runs
}

#[test]
fn the_backend_logs_the_pages_it_writes_while_asked_to() {
    let daemon = Daemon::start();
    let (mem, mut t, kick, irq) = written_once(&daemon, 0x33);
    let ok = VIRTIO_BLK_S_OK as u8;

    // Handed over while the device runs: it stops and restarts its rings.
    let log = Arc::new(BackendLog::new(1 << 20).unwrap());
    t.log_backend_writes(Some(log.clone())).unwrap();
    assert!(t.is_active() && !t.is_paused(), "status {:#x}", t.status());
    drained(&log);

    // A write: the backend reads the data; it writes the status byte and
    // the used ring.
    assert_eq!(
        request(&mem, &kick, &irq, 1, VIRTIO_BLK_T_OUT, 16, 4096),
        ok
    );
    assert_eq!(drained(&log), vec![(USED, 4096), (STATUS, 4096)]);
    // A read: and the guest's buffer.
    mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mem, &kick, &irq, 2, VIRTIO_BLK_T_IN, 8, 4096), ok);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x33; 4096]);
    assert_eq!(
        drained(&log),
        vec![(USED, 4096), (STATUS, 4096), (DATA, 4096)]
    );

    // Taken back: the backend stops logging (LOG_ALL no longer acked).
    t.log_backend_writes(None).unwrap();
    assert!(t.is_active() && !t.is_paused());
    assert_eq!(request(&mem, &kick, &irq, 3, VIRTIO_BLK_T_IN, 8, 4096), ok);
    assert_eq!(drained(&log), vec![]);
}
