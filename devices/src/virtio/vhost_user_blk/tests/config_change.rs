//! The backend's config-change message (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
//! on the channel kiln-vmm hands it with SET_BACKEND_REQ_FD) reaches the
//! guest: against a minimal vhost-user-blk backend that speaks the protocol
//! on a real Unix socket, offers CONFIG and BACKEND_REQ, and "resizes" its
//! disk (qemu-storage-daemon 7.2 sends no config change on block_resize).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

const GET_FEATURES: u32 = 1;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_CONFIG: u32 = 24;
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
const VERSION: u32 = 1;
const REPLY: u32 = 1 << 2;
const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// What the test backend shares with the test.
#[derive(Default)]
struct State {
    capacity: AtomicU64,
    /// The frontend's request channel, from SET_BACKEND_REQ_FD.
    channel: Mutex<Option<File>>,
}

fn reply(s: &mut UnixStream, request: u32, body: &[u8]) {
    let mut m = Vec::with_capacity(12 + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
}

/// Serves one frontend until it hangs up.
fn serve(mut s: UnixStream, state: &State) {
    loop {
        let mut hdr = [0u8; 12];
        // One descriptor at most matters here (SET_BACKEND_REQ_FD's).
        let (n, file) = match s.recv_with_fd(&mut hdr) {
            Ok(r) => r,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        s.read_exact(&mut hdr[n..]).unwrap();
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (request, size) = (word(0), word(8));
        let mut body = vec![0u8; size as usize];
        s.read_exact(&mut body).unwrap();
        match request {
            GET_FEATURES => {
                let f =
                    (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | F_PROTOCOL_FEATURES;
                reply(&mut s, request, &f.to_le_bytes());
            }
            GET_PROTOCOL_FEATURES => {
                let f = PROTOCOL_F_CONFIG | PROTOCOL_F_BACKEND_REQ;
                reply(&mut s, request, &f.to_le_bytes());
            }
            SET_BACKEND_REQ_FD => {
                *state.channel.lock().unwrap() = file;
            }
            GET_CONFIG => {
                // offset, size, flags, then the config space asked for.
                let len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                let mut out = body[..12].to_vec();
                let mut config = vec![0u8; len];
                config[..8].copy_from_slice(&state.capacity.load(Ordering::SeqCst).to_le_bytes());
                out.extend_from_slice(&config);
                reply(&mut s, request, &out);
            }
            GET_VRING_BASE => {
                let mut state = body[..4].to_vec();
                state.extend_from_slice(&0u32.to_le_bytes());
                reply(&mut s, request, &state);
            }
            // Nothing else expects an answer without REPLY_ACK.
            _ => {}
        }
    }
}

#[test]
fn a_config_change_message_reaches_the_guest() {
    let dir = TempDir::new_with_prefix("/tmp/kiln-vublk-").unwrap();
    let sock = dir.as_path().join("resizing.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let state = Arc::new(State::default());
    state.capacity.store(2048, Ordering::SeqCst);
    let st = state.clone();
    let backend = std::thread::spawn(move || serve(listener.accept().unwrap().0, &st));

    let dev = VhostUserBlock::connect(VhostUserBlockConfig {
        socket: sock.clone(),
        queues: 1,
    })
    .unwrap();
    assert_eq!(dev.capacity_sectors(), 2048);
    let mem = shared_mem();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), irq.try_clone().unwrap())
        .unwrap()
        .try_with_worker_hook(Arc::new(|| {}))
        .unwrap();
    bring_up(&mut t, &mem);
    assert!(t.is_active(), "status {:#x}", t.status());
    let generation = r32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION);
    let channel = state
        .channel
        .lock()
        .unwrap()
        .take()
        .expect("SET_BACKEND_REQ_FD");
    let mut channel = UnixStream::from(std::os::fd::OwnedFd::from(channel));

    // The disk grows; the backend says so.
    state.capacity.store(8192, Ordering::SeqCst);
    let mut msg = Vec::new();
    msg.extend_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    channel.write_all(&msg).unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut cap = [0u8; 8];
        t.read(u64::from(VIRTIO_MMIO_CONFIG), &mut cap);
        if u64::from_le_bytes(cap) == 8192 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never saw the new size"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(
        r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    assert_ne!(r32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), generation);
    assert!(irq.read().unwrap() >= 1);
    // A reset takes the rings back (GET_VRING_BASE) as usual.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
    drop(t);
    backend.join().unwrap();
}
