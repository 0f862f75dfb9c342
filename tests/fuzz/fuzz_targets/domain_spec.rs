#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| capvirt_fuzz::domain_spec(data));
