//! cgroup v2 limits for kiln-vmm processes: `<root>/kiln/vm-<id>` with
//! `cpu.max` from the vCPU count and `memory.max` from guest RAM plus the
//! VMM's own overhead. Without cgroup v2 (a v1 or hybrid host) VMs run
//! without limits and the node says so.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const CGROUP_FS: &str = "/sys/fs/cgroup";
/// What kiln-vmm itself may use beyond guest RAM.
pub const VMM_OVERHEAD_MIB: u64 = 128;

/// The agent's cgroup, made (with the cpu and memory controllers enabled
/// for its children) if cgroup v2 is mounted.
pub fn root() -> Option<PathBuf> {
    let fs = Path::new(CGROUP_FS);
    if !fs.join("cgroup.controllers").exists() {
        return None;
    }
    let root = fs.join("kiln");
    let r = (|| -> Result<()> {
        std::fs::create_dir_all(&root)?;
        std::fs::write(fs.join("cgroup.subtree_control"), "+cpu +memory")?;
        std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory")?;
        Ok(())
    })();
    match r {
        Ok(()) => Some(root),
        Err(e) => {
            tracing::warn!(
                "cgroup v2 is mounted but unusable ({e:#}); VMs run without cgroup limits"
            );
            None
        }
    }
}

/// Puts `pid` into the VM's own cgroup with its limits.
pub fn place(root: &Path, vm_id: &str, pid: u32, vcpus: u32, memory_mib: u64) -> Result<PathBuf> {
    let dir = root.join(format!("vm-{vm_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("cpu.max"),
        format!("{} 100000", u64::from(vcpus) * 100_000),
    )?;
    let bytes = (memory_mib + VMM_OVERHEAD_MIB) << 20;
    std::fs::write(dir.join("memory.max"), bytes.to_string())?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("cannot move kiln-vmm into {}", dir.display()))?;
    Ok(dir)
}

/// Removes a VM's (empty) cgroup.
pub fn remove(dir: &Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}
