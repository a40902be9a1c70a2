//! How a VM ends: devices and vCPUs report it here, the VMM's event loop
//! waits on the eventfd. The first reason reported wins.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, triple fault).
    Reset,
    /// A vCPU or KVM failed; the VM cannot go on.
    Error(String),
    /// The VM was migrated: it runs in another kiln-vmm now.
    Migrated,
}

pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    /// Set with `reason`; read without the lock on every vCPU exit.
    ended: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            ended: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless an earlier reason was recorded, and wakes the
    /// event loop.
    pub fn signal(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
            self.ended.store(true, Ordering::Release);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal VM exit: {e}");
        }
    }

    /// Whether a reason has been recorded: the VM is ending, and a vCPU
    /// should not enter the guest again.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_eventfd() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        assert!(!s.has_ended());
        s.signal(VmExit::Reset);
        assert!(s.has_ended());
        s.signal(VmExit::PowerOff);
        assert_eq!(s.reason(), Some(VmExit::Reset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
