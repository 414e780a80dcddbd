//! Arbitrary bytes into the license parser (envelope and payload layers).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kooagent_core::license::fuzz_parse(data);
});
