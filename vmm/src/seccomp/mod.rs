//! Seccomp filters, one per kind of thread, kept as data in `x86_64.json`
//! and compiled by seccompiler when kiln-vmm starts. A thread installs its
//! filter before it touches the guest; a syscall outside it kills the
//! whole process (SIGSYS).

use std::collections::HashMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, TargetArch};

use crate::runtime::{Confinement, ThreadHook};

const FILTERS_JSON: &str = include_str!("x86_64.json");

/// The kinds of thread, named as in the JSON.
pub const MAIN: &str = "main";
pub const VCPU: &str = "vcpu";
pub const IO: &str = "io";
pub const VHOST_USER: &str = "vhost_user";
pub const API: &str = "api";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot compile the seccomp filters: {0}")]
    Compile(seccompiler::Error),
    #[error("no seccomp filter named {0:?}")]
    Missing(&'static str),
}

/// The compiled filters.
pub struct Filters(HashMap<String, BpfProgram>);

impl Filters {
    pub fn compile() -> Result<Self, Error> {
        seccompiler::compile_from_json(FILTERS_JSON.as_bytes(), TargetArch::x86_64)
            .map(Self)
            .map_err(Error::Compile)
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_has_a_filter() {
        let f = Filters::compile().unwrap();
        for name in [MAIN, VCPU, IO, VHOST_USER, API] {
            assert!(!f.0[name].is_empty(), "{name}");
        }
    }

    #[test]
    fn a_forbidden_syscall_kills_the_process() {
        // Fork so the filter and the kill stay in the child.
        let f = Filters::compile().unwrap();
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
