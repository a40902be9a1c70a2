//! kiln-vmm library
