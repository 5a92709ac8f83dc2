//! Decodes arbitrary bytes as an uncompressed bootstrap: it must never panic, whatever decodes
//! must answer every lookup, and encoding it again must give back exactly the input (the
//! layout is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fuse::format::Bootstrap;

mod walk;

fuzz_target!(|data: &[u8]| {
    if let Ok(bootstrap) = Bootstrap::decode_raw(data) {
        walk::every_lookup(&bootstrap);
        let encoded = bootstrap.encode_raw();
        assert_eq!(encoded, data, "a decoded bootstrap re-encodes to different bytes");
        let again = Bootstrap::decode_raw(&encoded).expect("a re-encoded bootstrap decodes");
        assert_eq!(again, bootstrap);
    }
});
