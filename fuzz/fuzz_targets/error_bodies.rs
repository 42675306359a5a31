#![no_main]
//! `cargo fuzz run error_bodies`: see llm_worker::fuzzing::error_bodies.

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_worker::fuzzing::error_bodies(data));
