//! A snapshot's state file (`DIR/state`) as kiln-vmm reads it on
//! `--restore`: the container (magic, version, length, SHA-256) and the
//! JSON inside, down to the configuration and device state. The input is
//! the file; a checksum over it is fixed up half the time so that the
//! fuzzer also reaches the body.

#![no_main]

use kiln_vmm::persist;
use kiln_vmm::snapshot::{format, VmSnapshot};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) && file.len() > 32 {
        // Make the trailer the checksum of what precedes it.
        let body = file.len() - 32;
        let sum = Sha256::digest(&file[..body]);
        file[body..].copy_from_slice(&sum);
    }
    let path = std::path::Path::new("fuzz/state");
    if let Ok((_, snap)) = format::decode::<VmSnapshot>(path, &file) {
        let _ = persist::saved_config(&snap);
        let _ = persist::saved_devices(&snap);
    }
});
