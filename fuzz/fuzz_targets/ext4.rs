#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| provd_fuzz::ext4(data));
