//! A migration frame's payload as the destination (or the source) decodes
//! it: the first input byte is the frame type, the rest its payload.

#![no_main]

use kiln_vmm::migration::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&t, payload)) = data.split_first() {
        let _ = protocol::decode(t, payload.to_vec());
    }
});
