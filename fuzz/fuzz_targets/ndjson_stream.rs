#![no_main]
//! `cargo fuzz run ndjson_stream`: see llm_worker::fuzzing::ndjson_stream.

libfuzzer_sys::fuzz_target!(|data: &[u8]| llm_worker::fuzzing::ndjson_stream(data));
