#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provd_fuzz::manifest(data));
