#![no_main]
//! `cargo fuzz run job_decode`: see llm_worker::fuzzing::job_decode.

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_worker::fuzzing::job_decode(data));
