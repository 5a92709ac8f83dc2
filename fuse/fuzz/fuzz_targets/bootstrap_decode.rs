//! Decodes arbitrary bytes as a compressed bootstrap: it must never panic, never allocate
//! beyond the decompression limit, and whatever decodes must answer every lookup.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fuse::format::Bootstrap;

mod walk;

/// Far below the production limit so a decompression bomb is refused quickly.
const MAX_DECOMPRESSED: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(bootstrap) = Bootstrap::decode_with_limit(data, MAX_DECOMPRESSED) {
        walk::every_lookup(&bootstrap);
    }
});
