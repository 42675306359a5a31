#![no_main]
//! `cargo fuzz run retry_hints`: see llm_worker::fuzzing::retry_hints.

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_worker::fuzzing::retry_hints(data));
