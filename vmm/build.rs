//! Compiles the seccomp filters (`src/seccomp/x86_64.json`) to BPF at build
//! time, as Firecracker does: kiln-vmm includes the programs
//! (`$OUT_DIR/seccomp-<thread kind>.bpf`, 8-byte `sock_filter`s, little
//! endian) and only installs them at run time.

use std::path::PathBuf;

const FILTERS: &str = "src/seccomp/x86_64.json";

fn main() {
    println!("cargo:rerun-if-changed={FILTERS}");
    println!("cargo:rerun-if-changed=build.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        panic!("kiln-vmm's seccomp filters are written for x86_64, not {arch}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let json = std::fs::File::open(FILTERS).expect("the seccomp filters are readable");
    let filters = seccompiler::compile_from_json(json, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{FILTERS}: {e}"));
    for (name, program) in filters {
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        let path = out.join(format!("seccomp-{name}.bpf"));
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
