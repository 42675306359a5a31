//! The demo mode of the fake server (the `fake-llm-server` binary): the model name picks the
//! behaviour instead of a script.

use std::time::Duration;

use serde_json::json;

use crate::{Demo, Reply};

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

/// The demo reply for `model` (see [`FakeLlmServer::demo_mode`]).
pub(crate) fn demo_reply(demo: Demo, model: &str, prompt: &str) -> Reply {
    if model.contains("error") {
        return Reply::status(500, "fake-llm-server: injected error");
    }
    if model.contains("filter") {
        let body = json!({"error": {"message": "fake-llm-server: injected refusal",
            "type": "invalid_request_error", "code": "content_filter"}});
        return Reply::Status {
            status: 400,
            body: body.to_string(),
            headers: Vec::new(),
        };
    }
    if model.contains("silent") {
        return Reply::Hang;
    }
    let seed = prompt.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let deltas: Vec<String> = (0..demo.words.max(1))
        .map(|i| {
            let w = WORDS[(seed + i) % WORDS.len()];
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    if model.contains("cut") {
        return Reply::Cut {
            deltas: deltas[..deltas.len() / 2].to_vec(),
        };
    }
    let usage = (
        (prompt.chars().count() as u64).div_ceil(4),
        deltas.len() as u64,
    );
    Reply::Answer {
        deltas,
        usage: Some(usage),
        done_marker: true,
        chunk_delay: Duration::from_secs(1)
            .checked_div(u32::try_from(demo.tokens_per_sec).unwrap_or(u32::MAX))
            .unwrap_or_default(),
    }
}
