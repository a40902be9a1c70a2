//! Snapshots of a real (tiny) guest on this machine's /dev/kvm: it counts
//! in two memory words and a register; the snapshot is restored into new
//! VMs whose RAM is mapped from the memory file, and it counts on.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_devices::{Bus, ExitSignal};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::vstate::dirty::{self, DirtyLog};
use crate::vstate::kvm::Kvm;
use crate::vstate::memory as guest_memory;
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuContext};
use crate::vstate::vm::Vm;

const MEM: u64 = 64 << 20;
const CODE: u64 = 0x10_0000;
const COUNTER: u64 = 0x20_0000;
const SECOND: u64 = 0x3f_f008;

/// `inc qword [0x200000]; inc qword [0x3ff008]; inc rbx; jmp` back.
const LOOP: &[u8] = &[
    0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, //
    0x48, 0xff, 0x04, 0x25, 0x08, 0xf0, 0x3f, 0x00, //
    0x48, 0xff, 0xc3, //
    0xeb, 0xeb,
];

fn kvm() -> Option<Kvm> {
    if let Err(e) = kiln_tests::tiny::local_kvm() {
        kiln_tests::skip(format!("{e}; snapshot tests need it"));
        return None;
    }
    Some(Kvm::open().expect("open /dev/kvm"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A VM and its vCPUs, each running on its thread.
struct Running {
    vm: Vm,
    mem: GuestMemoryMmap,
    gate: Arc<PauseGate>,
    threads: Vec<libc::pthread_t>,
}

impl Running {
    /// Starts the vCPU threads, paused before their first instruction.
    fn start(vm: Vm, mem: GuestMemoryMmap, vcpus: Vec<Vcpu>) -> Self {
        Self::start_with(vm, mem, vcpus, Bus::new())
    }

    fn start_with(vm: Vm, mem: GuestMemoryMmap, vcpus: Vec<Vcpu>, pio: Bus) -> Self {
        vcpu::install_kick_handler().unwrap();
        let gate = Arc::new(PauseGate::new_paused(vcpus.len()));
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            exit: Arc::new(ExitSignal::new().unwrap()),
            // The real vCPU filter: saving must not step outside it.
            on_start: crate::seccomp::Filters::load()
                .unwrap()
                .hook(crate::seccomp::VCPU)
                .unwrap(),
            pause: gate.clone(),
        };
        let threads = vcpus
            .into_iter()
            .map(|v| v.start(ctx.clone()).unwrap().as_pthread_t())
            .collect();
        Self {
            vm,
            mem,
            gate,
            threads,
        }
    }

    fn pause(&self) {
        self.gate
            .pause(self.threads.len(), vcpu::PAUSE_TIMEOUT, || {
                for t in &self.threads {
                    // SAFETY: the vCPU threads park instead of exiting, so
                    // the ids stay valid.
                    unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
                }
            })
            .unwrap();
    }

    fn count(&self) -> u64 {
        self.mem.read_obj(GuestAddress(COUNTER)).unwrap()
    }

    /// Runs the guest for at least `d`, and until it has counted 2000 more
    /// (the host may be busy: 2 cores, nested KVM), and pauses it again.
    fn run_for(&self, d: Duration) {
        let from = self.count();
        let deadline = Instant::now() + Duration::from_secs(20);
        self.gate.resume();
        std::thread::sleep(d);
        while self.count() < from + 2000 {
            assert!(Instant::now() < deadline, "the guest does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.pause();
    }

    fn snapshot(&self) -> VmSnapshot {
        let vcpus = self.gate.save_states(Duration::from_secs(1)).unwrap();
        VmSnapshot {
            id: new_id().unwrap(),
            memory_size: MEM,
            vcpus,
            vm: self.vm.save_state().unwrap(),
            devices: serde_json::Value::Null,
            config: serde_json::Value::Null,
        }
    }
}

/// A new VM running the counting loop from boot.
fn boot(kvm: &Kvm) -> Running {
    boot_with(kvm, LOOP, Bus::new())
}

fn boot_with(kvm: &Kvm, code: &[u8], pio: Bus) -> Running {
    boot_n(kvm, code, pio, 1)
}

/// `count` vCPUs: the first runs `code`, the others wait for a SIPI.
fn boot_n(kvm: &Kvm, code: &[u8], pio: Bus, count: u8) -> Running {
    let mem = guest_memory::create(MEM, guest_memory::Backing::Anonymous).unwrap();
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let vm = Vm::new(kvm, &mem).unwrap();
    let vcpus: Vec<Vcpu> = (0..count)
        .map(|i| {
            let vcpu = Vcpu::new(&vm, i).unwrap();
            vcpu.configure(&kvm.supported_cpuid, count).unwrap();
            vcpu
        })
        .collect();
    vcpus[0].configure_boot(&mem, GuestAddress(CODE)).unwrap();
    let r = Running::start_with(vm, mem, vcpus, pio);
    r.run_for(Duration::from_millis(30));
    r
}

/// A new VM with `snap`'s state and its RAM mapped from `dir/memory`,
/// paused before its first instruction.
fn restore(kvm: &Kvm, dir: &Path, backing: guest_memory::Backing) -> (Running, VmSnapshot) {
    let snap = load(dir).unwrap();
    let mem = restore_memory(dir, &snap, backing).unwrap();
    let vm = Vm::new(kvm, &mem).unwrap();
    vm.restore_state(&snap.vm).unwrap();
    let mut vcpus = Vec::new();
    for (i, saved) in snap.vcpus.iter().enumerate() {
        let mut vcpu = Vcpu::new(&vm, i as u8).unwrap();
        vcpu.restore_state(saved).unwrap();
        // What KVM now holds is what was saved.
        let back = vcpu.save_state().unwrap();
        assert_eq!(back.index, saved.index);
        assert_eq!(json(&back.mp_state), json(&saved.mp_state));
        assert_eq!(json(&back.regs), json(&saved.regs));
        assert_eq!(json(&back.sregs), json(&saved.sregs));
        assert_eq!(back.xsave, saved.xsave);
        assert_eq!(json(&back.xcrs), json(&saved.xcrs));
        assert_eq!(json(&back.cpuid), json(&saved.cpuid));
        vcpus.push(vcpu);
    }
    (Running::start(vm, mem, vcpus), snap)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn a_restored_guest_counts_on_from_where_it_was_twice() {
    let Some(kvm) = kvm() else { return };
    let dir = scratch("counts-on");
    let source = boot(&kvm);
    let snap = source.snapshot();
    let at = source.count();
    let rbx = snap.vcpus[0].regs.rbx;
    assert!(at > 1000, "the guest ran: {at}");
    // The counter is incremented before rbx in the loop.
    assert!(at == rbx || at == rbx + 1, "counter {at}, rbx {rbx}");
    save(&dir, &snap, &source.mem).unwrap();

    // The source runs on and counts further; the snapshot does not move.
    source.run_for(Duration::from_millis(10));
    assert!(source.count() > at);

    for round in 0..2 {
        let (r, _) = restore(&kvm, &dir, guest_memory::Backing::Anonymous);
        assert_eq!(r.count(), at, "round {round}: RAM as saved");
        r.run_for(Duration::from_millis(30));
        let now = r.count();
        assert!(now > at + 1000, "round {round}: counts on from {at}: {now}");
        let regs = r.gate.save_states(Duration::from_secs(1)).unwrap()[0].regs;
        assert!(
            regs.rbx > rbx,
            "round {round}: rbx {} after {rbx}",
            regs.rbx
        );
        assert!(now == regs.rbx || now == regs.rbx + 1);
        let second: u64 = r.mem.read_obj(GuestAddress(SECOND)).unwrap();
        assert!(second.abs_diff(regs.rbx) <= 1);
        // Its writes are private: the memory file still holds the snapshot.
        let f = std::fs::read(dir.join(MEMORY_FILE)).unwrap();
        let off = (memory::HEADER_SIZE + COUNTER) as usize;
        assert_eq!(u64::from_le_bytes(f[off..off + 8].try_into().unwrap()), at);
    }

    // A VM with a vhost-user disk gets the RAM in a shared memfd.
    let (r, _) = restore(&kvm, &dir, guest_memory::Backing::SharedMemfd);
    assert_eq!(r.count(), at);
    r.run_for(Duration::from_millis(20));
    assert!(r.count() > at);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A port that counts its reads and answers each with the count.
struct Counter(Arc<std::sync::atomic::AtomicU32>);

impl kiln_devices::BusDevice for Counter {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let len = data.len().min(4);
        data[..len].copy_from_slice(&n.to_le_bytes()[..len]);
    }
    fn write(&mut self, _: u64, _: &[u8]) {}
}

/// A vCPU paused right after the VMM answered its port read has not
/// taken the answer yet: the save first lets KVM finish the instruction,
/// so the saved RAX holds the last value the device gave.
#[test]
fn a_save_completes_the_io_the_device_answered() {
    let Some(kvm) = kvm() else { return };
    // mov dx, 0x510; in eax, dx; mov [0x200000], eax; inc rbx; jmp to in.
    let code = [
        0x66, 0xba, 0x10, 0x05, //
        0xed, //
        0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, //
        0x48, 0xff, 0xc3, //
        0xeb, 0xf3,
    ];
    let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(std::sync::Mutex::new(Counter(reads.clone()))),
        0x510,
        4,
    )
    .unwrap();
    let r = boot_with(&kvm, &code, pio);
    // Most pauses catch the vCPU between an answered read and its
    // completion (the guest spends its time in port exits); a kick that
    // lands in the guest finds the read completed anyway. Either way the
    // saved RAX is the last answer (without the completion it is the one
    // before).
    for _ in 0..5 {
        let answered = reads.load(std::sync::atomic::Ordering::SeqCst);
        assert!(answered > 100, "the guest read the port: {answered}");
        let s = r.gate.save_states(Duration::from_secs(1)).unwrap();
        assert_eq!(s[0].regs.rax as u32, answered);
        // The store after the read may or may not have run.
        let stored = r.count() as u32;
        assert!(stored == answered || stored == answered - 1, "{stored}");
        r.run_for(Duration::from_millis(10));
    }
}

/// Two vCPUs, the second never started (waiting for its SIPI): both are
/// saved, in index order, and the second stays waiting after a restore
/// while the first counts on.
#[test]
fn a_waiting_second_vcpu_is_saved_and_restored_waiting() {
    let Some(kvm) = kvm() else { return };
    let dir = scratch("two-vcpus");
    let source = boot_n(&kvm, LOOP, Bus::new(), 2);
    let snap = source.snapshot();
    assert_eq!(
        snap.vcpus.iter().map(|v| v.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        snap.vcpus[0].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_RUNNABLE
    );
    assert_ne!(
        snap.vcpus[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_RUNNABLE
    );
    // The APs' APIC ids follow their index.
    let apic_id = |v: &crate::vstate::vcpu_state::VcpuState| v.lapic.regs[0x23] as u8;
    assert_eq!((apic_id(&snap.vcpus[0]), apic_id(&snap.vcpus[1])), (0, 1));
    save(&dir, &snap, &source.mem).unwrap();
    let at = source.count();
    let (r, _) = restore(&kvm, &dir, guest_memory::Backing::Anonymous);
    r.run_for(Duration::from_millis(10));
    assert!(r.count() > at);
    let states = r.gate.save_states(Duration::from_secs(1)).unwrap();
    assert_eq!(json(&states[1].mp_state), json(&snap.vcpus[1].mp_state));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshot_files_are_private_and_memory_is_sparse() {
    let Some(kvm) = kvm() else { return };
    let dir = scratch("sparse");
    let source = boot(&kvm);
    let snap = source.snapshot();
    let stats = save(&dir, &snap, &source.mem).unwrap();
    for name in [STATE_FILE, MEMORY_FILE] {
        let m = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}");
    }
    let m = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
    assert_eq!(m.len(), memory::HEADER_SIZE + MEM);
    // Code, page tables, GDT, the two counters: a few pages of 64 MiB.
    assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
    assert!(stats.memory.written_bytes <= 16 * 4096, "{stats:?}");
    assert_eq!(stats.memory.ram_bytes, MEM);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each refusal of a damaged snapshot names what is wrong.
#[test]
fn damaged_snapshots_are_refused_with_their_reason() {
    let Some(kvm) = kvm() else { return };
    let (dir, other) = (scratch("damaged"), scratch("damaged-other"));
    let source = boot(&kvm);
    let snap = source.snapshot();
    save(&dir, &snap, &source.mem).unwrap();
    let good = std::fs::read(dir.join(STATE_FILE)).unwrap();
    let state_err = |bytes: &[u8]| {
        std::fs::write(dir.join(STATE_FILE), bytes).unwrap();
        load(&dir).unwrap_err().to_string()
    };
    assert!(state_err(&good[..good.len() / 2]).contains("truncated"));
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x20;
    assert!(state_err(&flipped).contains("edited or corrupt"));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(state_err(&magic).contains("not a kiln-vmm snapshot"));
    let mut future = good.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    assert!(state_err(&future).contains("written by format 99, this kiln-vmm reads 1..=1"));
    std::fs::write(dir.join(STATE_FILE), &good).unwrap();

    // The memory file of another snapshot of the same VM.
    let second = source.snapshot();
    save(&other, &second, &source.mem).unwrap();
    std::fs::copy(other.join(MEMORY_FILE), dir.join(MEMORY_FILE)).unwrap();
    let restore_err = || {
        restore_memory(&dir, &load(&dir).unwrap(), guest_memory::Backing::Anonymous)
            .unwrap_err()
            .to_string()
    };
    assert!(restore_err().contains(&format!("belongs to snapshot {:032x}", second.id)));
    // A truncated one, and one for another RAM size.
    save(&dir, &snap, &source.mem).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    f.set_len(memory::HEADER_SIZE + MEM - 4096).unwrap();
    assert!(restore_err().contains("truncated"), "{}", restore_err());
    let mut bigger = load(&dir).unwrap();
    bigger.memory_size = 2 * MEM;
    let e = restore_memory(&dir, &bigger, guest_memory::Backing::Anonymous).unwrap_err();
    assert!(e.to_string().contains("holds 67108864 bytes of RAM"), "{e}");
    f.set_len(10).unwrap();
    assert!(restore_err().contains("truncated"));
    std::fs::write(dir.join(MEMORY_FILE), b"hello").unwrap();
    assert!(restore_err().contains("not a kiln-vmm memory file"));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
}

#[test]
fn the_dirty_log_reports_exactly_the_pages_the_guest_writes() {
    let Some(kvm) = kvm() else { return };
    let r = boot(&kvm);
    let mut log = DirtyLog::start(&r.vm).unwrap();
    assert!(log.is_on());
    let expected = vec![(COUNTER / 4096) as usize, (SECOND / 4096) as usize];
    for _ in 0..2 {
        r.run_for(Duration::from_millis(20));
        let b = log.fetch(&r.vm).unwrap();
        assert_eq!(b.pages(), dirty::ram_pages(&r.mem));
        assert_eq!(b.iter().collect::<Vec<_>>(), expected);
        assert_eq!(
            dirty::page_address(&r.mem, expected[1]),
            Some(GuestAddress(SECOND & !4095))
        );
    }
    // Paused, the guest writes nothing: the fetch above cleared the log.
    assert_eq!(log.fetch(&r.vm).unwrap().count(), 0);
    log.stop(&r.vm).unwrap();
    r.run_for(Duration::from_millis(5));
}

/// Saving RAM scans it at memory speed; the log line gives the rate.
#[test]
fn memory_file_write_rate() {
    let dir = scratch("rate");
    std::fs::create_dir_all(&dir).unwrap();
    let size = 512 << 20;
    let mem = guest_memory::create(size, guest_memory::Backing::Anonymous).unwrap();
    // One page in 16 holds data.
    for page in (0..size / 4096).step_by(16) {
        mem.write_obj(page | 1, GuestAddress(page * 4096 + 8))
            .unwrap();
    }
    let path = dir.join(MEMORY_FILE);
    let started = Instant::now();
    let stats = memory::write(&path, &mem, 7).unwrap();
    eprintln!(
        "memory file: {} MiB of RAM, {} MiB written, {:?}: {:.2} GB/s",
        stats.ram_bytes >> 20,
        stats.written_bytes >> 20,
        started.elapsed(),
        stats.gb_per_s()
    );
    assert_eq!(stats.written_bytes, size / 16);
    let back = memory::map_private(&path, 7, size).unwrap();
    for page in [0, 16, size / 4096 - 16] {
        let v: u64 = back.read_obj(GuestAddress(page * 4096 + 8)).unwrap();
        assert_eq!(v, page | 1);
    }
    let v: u64 = back.read_obj(GuestAddress(4096 + 8)).unwrap();
    assert_eq!(v, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Shared (memfd) RAM is saved by its data ranges only (reading its holes
/// would allocate them), and copied back into a memfd that keeps the
/// memory file's holes.
#[test]
fn shared_memory_is_saved_and_restored_by_its_data() {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let dir = scratch("shared");
    std::fs::create_dir_all(&dir).unwrap();
    let size = 256 << 20;
    let mem = guest_memory::create(size, guest_memory::Backing::SharedMemfd).unwrap();
    let pages = [0u64, 1, 4095, 40_000, size / 4096 - 1];
    for p in pages {
        mem.write_obj(p + 1, GuestAddress(p * 4096 + 16)).unwrap();
    }
    // A page the guest touched but left zero is not written either.
    mem.write_obj(0u64, GuestAddress(12_345 * 4096)).unwrap();
    let path = dir.join(MEMORY_FILE);
    let stats = memory::write(&path, &mem, 42).unwrap();
    assert_eq!(stats.written_bytes, pages.len() as u64 * 4096);
    let blocks = |m: &GuestMemoryMmap| {
        let r = m.iter().next().unwrap();
        r.file_offset().unwrap().file().metadata().unwrap().blocks() * 512
    };
    assert!(
        blocks(&mem) < 4 << 20,
        "saving filled the memfd: {}",
        blocks(&mem)
    );
    let back = memory::copy_into_memfd(&path, 42, size).unwrap();
    for p in pages {
        let v: u64 = back.read_obj(GuestAddress(p * 4096 + 16)).unwrap();
        assert_eq!(v, p + 1);
    }
    assert!(blocks(&back) < 4 << 20, "the memfd holds {}", blocks(&back));
    std::fs::remove_dir_all(&dir).unwrap();
}
