//! Seccomp filters, one per kind of thread, kept as data in `x86_64.json`
//! and compiled to BPF by seccompiler when kiln-vmm is built (`build.rs`);
//! kiln-vmm includes the programs and only installs them. A thread installs
//! its filter before it touches the guest; a syscall outside it kills the
//! whole process (SIGSYS).

use std::collections::HashMap;
use std::sync::Arc;

use seccompiler::{sock_filter, BpfProgram};

use crate::runtime::{Confinement, ThreadHook};

/// The kinds of thread, named as in the JSON.
pub const MAIN: &str = "main";
pub const VCPU: &str = "vcpu";
pub const IO: &str = "io";
pub const VHOST_USER: &str = "vhost_user";
pub const API: &str = "api";
pub const MIGRATION: &str = "migration";

/// Each thread kind's BPF program, as build.rs compiled it.
const PROGRAMS: [(&str, &[u8]); 6] = [
    (
        MAIN,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-main.bpf")),
    ),
    (
        VCPU,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vcpu.bpf")),
    ),
    (
        IO,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-io.bpf")),
    ),
    (
        VHOST_USER,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-vhost_user.bpf")),
    ),
    (
        API,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-api.bpf")),
    ),
    (
        MIGRATION,
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-migration.bpf")),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the seccomp filter {0:?} built into kiln-vmm is corrupt")]
    Corrupt(&'static str),
    #[error("no seccomp filter named {0:?}")]
    Missing(&'static str),
}

/// The compiled filters.
pub struct Filters(HashMap<String, BpfProgram>);

impl Filters {
    /// The programs built into kiln-vmm.
    pub fn load() -> Result<Self, Error> {
        PROGRAMS
            .iter()
            .map(|&(name, bytes)| Ok((name.to_string(), decode(name, bytes)?)))
            .collect::<Result<HashMap<_, _>, Error>>()
            .map(Self)
    }

    /// A hook that installs filter `name` on the calling thread.
    pub fn hook(&self, name: &'static str) -> Result<ThreadHook, Error> {
        let prog = Arc::new(self.0.get(name).ok_or(Error::Missing(name))?.clone());
        Ok(Arc::new(move || {
            seccompiler::apply_filter(&prog).map_err(|e| format!("seccomp ({name}): {e}"))
        }))
    }

    /// Hooks for every thread kind.
    pub fn confinement(&self) -> Result<Confinement, Error> {
        Ok(Confinement {
            main: self.hook(MAIN)?,
            vcpu: self.hook(VCPU)?,
            io: self.hook(IO)?,
            vhost_user: self.hook(VHOST_USER)?,
            api: self.hook(API)?,
            migration: self.hook(MIGRATION)?,
        })
    }
}

/// 8-byte little-endian `sock_filter`s, as build.rs writes them.
fn decode(name: &'static str, bytes: &[u8]) -> Result<BpfProgram, Error> {
    let insns = bytes.chunks_exact(8);
    if bytes.is_empty() || !insns.remainder().is_empty() {
        return Err(Error::Corrupt(name));
    }
    Ok(insns
        .map(|b| sock_filter {
            code: u16::from_le_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_programs_are_the_json_compiled() {
        let json = include_str!("x86_64.json");
        let compiled =
            seccompiler::compile_from_json(json.as_bytes(), seccompiler::TargetArch::x86_64)
                .unwrap();
        let built = Filters::load().unwrap();
        assert_eq!(compiled.len(), PROGRAMS.len(), "a thread kind is missing");
        for (name, prog) in compiled {
            assert!(built.0[&name] == prog, "{name}");
        }
        assert!(matches!(decode("x", &[0; 7]), Err(Error::Corrupt("x"))));
    }

    #[test]
    fn every_thread_kind_has_a_filter() {
        let f = Filters::load().unwrap();
        for name in [MAIN, VCPU, IO, VHOST_USER, API, MIGRATION] {
            assert!(!f.0[name].is_empty(), "{name}");
        }
    }

    #[test]
    fn a_forbidden_syscall_kills_the_process() {
        // Fork so the filter and the kill stay in the child.
        let f = Filters::load().unwrap();
        let hook = f.hook(VCPU).unwrap();
        // SAFETY: the child only installs a filter and makes raw syscalls
        // before _exit; it touches no lock the parent could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if hook().is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: getppid has no arguments; the filter forbids it.
            unsafe { libc::syscall(libc::SYS_getppid) };
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
