//! Tiny guest payloads that this machine's emulation-backed /dev/kvm can
//! run (a Linux kernel cannot): hand-made x86-64 code in a minimal ELF.

/// Load address of the tiny payloads: kiln-vmm loads kernels at or above 1 MiB.
const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal x86-64 ELF executable whose single segment is `code`, entered
/// in 64-bit mode at its first byte.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let entry = LOAD_ADDR + (EHDR + PHDR) as u64;
    let total = (EHDR + PHDR + code.len()) as u64;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, v1
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    v.extend_from_slice(&(EHDR as u16).to_le_bytes());
    v.extend_from_slice(&(PHDR as u16).to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // phnum
    v.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&5u32.to_le_bytes()); // R+X
    v.extend_from_slice(&0u64.to_le_bytes()); // offset
    v.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    v.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    v.extend_from_slice(&total.to_le_bytes()); // filesz
    v.extend_from_slice(&total.to_le_bytes()); // memsz
    v.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    v.extend_from_slice(code);
    v
}

/// Machine code: print `text` on COM1, then write `last_port`/`last_value`
/// (e.g. the ACPI sleep register) and halt.
pub fn serial_then_out(text: &[u8], last_port: u16, last_value: u8) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&last_port.to_le_bytes()); // mov dx, port
    c.extend_from_slice(&[0xb0, last_value, 0xee]); // mov al, v; out dx, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

/// Machine code: print `byte` on COM1 forever, with a busy delay of
/// `delay` iterations between bytes.
pub fn print_forever(byte: u8, delay: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0xb0, byte, 0xee]); // loop: mov al, byte; out dx, al
    c.push(0xb9); // mov ecx, delay
    c.extend_from_slice(&delay.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
    c.extend_from_slice(&[0xeb, 0xf2]); // jmp loop (-14)
    c
}

/// Machine code: echo COM1's input forever. It polls the line status
/// register (0x3fd; bit 0: data ready), with a busy delay of `delay`
/// iterations (at least 1) between polls that find nothing, reads the byte
/// from 0x3f8 and writes it back. No interrupts: the UART's receive side
/// works by polling alone.
pub fn echo_serial(delay: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xfd, 0x03]; // poll: mov dx, 0x3fd
    c.push(0xec); // in al, dx
    c.extend_from_slice(&[0xa8, 0x01]); // test al, 1
    c.extend_from_slice(&[0x75, 0]); // jnz got (patched below)
    let jnz_got = c.len();
    c.push(0xb9); // mov ecx, delay
    c.extend_from_slice(&delay.max(1).to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
    c.extend_from_slice(&[0xeb, rel8(c.len() + 2, 0)]); // jmp poll
    c[jnz_got - 1] = rel8(jnz_got, c.len());
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // got: mov dx, 0x3f8
    c.extend_from_slice(&[0xec, 0xee]); // in al, dx; out dx, al
    c.extend_from_slice(&[0xeb, rel8(c.len() + 2, 0)]); // jmp poll
    c
}

/// Machine code: what a driver does when its device never completes a
/// request (e.g. after a bad used-ring entry): poll a 32-bit word in guest
/// memory (here one that follows the code, and stays 0) with `pause`, forever.
/// Interrupts stay disabled and it never exits to the VMM: the vCPU is busy,
/// but only interrupts on the host interrupt it.
pub fn spin_on_memory() -> Vec<u8> {
    let mut c = vec![0xf3, 0x90]; // poll: pause
    c.extend_from_slice(&[0x8b, 0x05, 0, 0, 0, 0]); // mov eax, [rip + word]
    let after_mov = c.len();
    c.extend_from_slice(&[0x85, 0xc0]); // test eax, eax
    c.extend_from_slice(&[0x74, rel8(c.len() + 2, 0)]); // jz poll
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    let word = c.len();
    c[4..8].copy_from_slice(&((word - after_mov) as i32).to_le_bytes());
    c.extend_from_slice(&[0; 4]); // word: never set
    c
}

/// Machine code: count forever in a 64-bit word in guest memory (after the
/// code) and print, after each increment, `A` + the count's low 4 bits on
/// COM1: ABCD...OPAB..., with a busy delay of `delay` iterations between
/// letters. The letter sequence shows where a restored guest resumed: its
/// first letter follows the last one printed before the snapshot.
pub fn count_forever(delay: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let top = c.len();
    c.extend_from_slice(&[0x48, 0xff, 0x05, 0, 0, 0, 0]); // inc qword [rip + count]
    let after_inc = c.len();
    c.extend_from_slice(&[0x48, 0x8b, 0x05, 0, 0, 0, 0]); // mov rax, [rip + count]
    let after_mov = c.len();
    c.extend_from_slice(&[0x24, 0x0f, 0x04, b'A', 0xee]); // and al, 15; add al, 'A'; out dx, al
    c.push(0xb9); // mov ecx, delay
    c.extend_from_slice(&delay.max(1).to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz -4
    c.extend_from_slice(&[0xeb, rel8(c.len() + 2, top)]); // jmp top
    let count = c.len();
    c[after_inc - 4..after_inc].copy_from_slice(&((count - after_inc) as i32).to_le_bytes());
    c[after_mov - 4..after_mov].copy_from_slice(&((count - after_mov) as i32).to_le_bytes());
    c.extend_from_slice(&[0; 8]); // count
    c
}

/// The letter [`count_forever`] prints after `letter`.
pub fn next_count_letter(letter: u8) -> u8 {
    b'A' + ((letter.wrapping_sub(b'A') + 1) & 0x0f)
}

/// The 8-bit displacement of a jump whose next instruction is at `next`.
fn rel8(next: usize, target: usize) -> u8 {
    let d = target as isize - next as isize;
    i8::try_from(d).expect("a short jump") as u8
}

/// A guest that prints `text` and then halts for good: it runs until it is
/// powered off from outside.
pub fn print_then_halt(text: &[u8]) -> Vec<u8> {
    // Port 0x80 (POST codes) is a harmless last write.
    tiny_elf(&serial_then_out(text, 0x80, 0))
}

/// Whether /dev/kvm can be opened here.
pub fn local_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable here ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the short jump whose opcode is at `at` lands.
    fn lands(code: &[u8], at: usize) -> usize {
        (at as isize + 2 + code[at + 1] as i8 as isize) as usize
    }

    #[test]
    fn the_spinning_guest_polls_a_zero_word_after_its_code() {
        let c = spin_on_memory();
        assert_eq!(&c[..4], &[0xf3, 0x90, 0x8b, 0x05]);
        // RIP-relative: from the end of the mov (8) to the word (15).
        assert_eq!(i32::from_le_bytes(c[4..8].try_into().unwrap()), 7);
        assert_eq!(&c[15..], &[0, 0, 0, 0]);
        assert_eq!((c[10], lands(&c, 10)), (0x74, 0));
    }

    #[test]
    fn the_counting_guest_addresses_its_counter_after_the_code() {
        let c = count_forever(9);
        assert_eq!(&c[4..7], &[0x48, 0xff, 0x05]);
        let len = c.len();
        assert_eq!(&c[len - 8..], &[0; 8]);
        // Both RIP-relative operands land on the counter.
        let disp = |at: usize| i32::from_le_bytes(c[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(11 + disp(7), len - 8);
        assert_eq!(18 + disp(14), len - 8);
        // The loop jumps back to the increment.
        let jmp = len - 10;
        assert_eq!((c[jmp], lands(&c, jmp)), (0xeb, 4));
        assert_eq!(next_count_letter(b'A'), b'B');
        assert_eq!(next_count_letter(b'P'), b'A');
    }

    #[test]
    fn the_echo_guest_polls_then_echoes_and_loops() {
        let c = echo_serial(7);
        assert_eq!(
            &c[..9],
            &[0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x75, 0x0b]
        );
        assert_eq!(&c[9..14], &[0xb9, 7, 0, 0, 0]);
        // The delay loop, then back to the poll.
        assert_eq!((c[16], lands(&c, 16)), (0x75, 14));
        assert_eq!((c[18], lands(&c, 18)), (0xeb, 0));
        // Data ready: read it, write it back, poll again.
        let got = lands(&c, 7);
        assert_eq!(&c[got..got + 6], &[0x66, 0xba, 0xf8, 0x03, 0xec, 0xee]);
        assert_eq!((c[got + 6], lands(&c, got + 6)), (0xeb, 0));
        assert_eq!(c.len(), got + 8);
        // A zero delay would count down from 2^32.
        assert_eq!(&echo_serial(0)[10..14], &[1, 0, 0, 0]);
    }
}
