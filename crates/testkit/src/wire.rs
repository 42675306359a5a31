//! The four wire formats the fake server speaks (OpenAI, Anthropic, Gemini, Ollama): how a
//! scripted [`Reply`] becomes a response in each, streamed or whole.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode};
use futures::StreamExt;
use serde_json::json;

use crate::{Billing, Reply};

/// The wire format of a request, from the route it hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
    Ollama,
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn named(event: &str, data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn line(v: serde_json::Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

pub(crate) fn response(status: u16, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

fn openai_chunk(model: &str, delta: serde_json::Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
    .to_string()
}

/// OpenAI's `usage`: cached and reasoning tokens inside the totals, in the details objects
/// (sent with zeros too, as OpenAI does). Cache writes and image tokens are not reported.
fn openai_usage(b: &Billing) -> serde_json::Value {
    json!({"prompt_tokens": b.input, "completion_tokens": b.output, "total_tokens": b.input + b.output,
        "prompt_tokens_details": {"cached_tokens": b.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": b.reasoning, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
}

/// Anthropic's `usage`: `input_tokens` counts only what follows the last cache breakpoint;
/// cache reads and writes (by lifetime) come apart. No reasoning or image counts.
fn anthropic_usage(b: &Billing, output: u64) -> serde_json::Value {
    let written = b.cache_write + b.cache_write_1h;
    let mut u = json!({"input_tokens": b.input.saturating_sub(b.cache_read + written),
        "output_tokens": output});
    if b.cache_read + written > 0 {
        u["cache_read_input_tokens"] = json!(b.cache_read);
        u["cache_creation_input_tokens"] = json!(written);
        u["cache_creation"] = json!({"ephemeral_5m_input_tokens": b.cache_write,
            "ephemeral_1h_input_tokens": b.cache_write_1h});
    }
    u
}

/// Gemini's `usageMetadata`: thoughts apart from (not inside) `candidatesTokenCount`, cached
/// tokens and image tokens inside `promptTokenCount`. No cache writes (implicit caching).
fn gemini_usage(b: &Billing) -> serde_json::Value {
    let mut u = json!({"promptTokenCount": b.input,
        "candidatesTokenCount": b.output.saturating_sub(b.reasoning),
        "totalTokenCount": b.input + b.output});
    if b.reasoning > 0 {
        u["thoughtsTokenCount"] = json!(b.reasoning);
    }
    if b.cache_read > 0 {
        u["cachedContentTokenCount"] = json!(b.cache_read);
    }
    if b.image_input > 0 {
        u["promptTokensDetails"] = json!([
            {"modality": "TEXT", "tokenCount": b.input.saturating_sub(b.image_input)},
            {"modality": "IMAGE", "tokenCount": b.image_input}]);
    }
    u
}

fn gemini_chunk(text: &str, finish: bool, usage: Option<Billing>) -> serde_json::Value {
    let mut c = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    if finish {
        c["finishReason"] = json!("STOP");
    }
    let mut v = json!({"candidates": [c], "modelVersion": "fake"});
    if let Some(b) = usage {
        v["usageMetadata"] = gemini_usage(&b);
    }
    v
}

/// The streamed body of an answer: the deltas, then (if `complete`) the finish signal, usage
/// and (if `done_marker`) the transport sentinel.
fn stream_frames(
    flavor: Flavor,
    model: &str,
    deltas: &[String],
    usage: Option<Billing>,
    complete: bool,
    done_marker: bool,
) -> Vec<Bytes> {
    let billed = usage.unwrap_or_default();
    let (input, output) = (billed.input, billed.output);
    let mut frames = Vec::new();
    match flavor {
        Flavor::OpenAi => {
            frames.push(sse(&openai_chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )));
            frames.extend(
                deltas
                    .iter()
                    .map(|d| sse(&openai_chunk(model, json!({"content": d}), None))),
            );
            if complete {
                frames.push(sse(&openai_chunk(model, json!({}), Some("stop"))));
                if usage.is_some() {
                    let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                        "choices": [], "usage": openai_usage(&billed)});
                    frames.push(sse(&u.to_string()));
                }
                if done_marker {
                    frames.push(sse("[DONE]"));
                }
            }
        }
        Flavor::Anthropic => {
            frames.push(named(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                "role": "assistant", "content": [], "model": model, "stop_reason": null,
                "usage": anthropic_usage(&billed, 1)}}),
            ));
            frames.push(named("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
            frames.push(named("ping", json!({"type": "ping"})));
            frames.extend(deltas.iter().map(|d| {
                named("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}))
            }));
            if complete {
                frames.push(named(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                frames.push(named("message_delta", json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}})));
                if done_marker {
                    frames.push(named("message_stop", json!({"type": "message_stop"})));
                }
            }
        }
        Flavor::Gemini => {
            let n = deltas.len();
            for (i, d) in deltas.iter().enumerate() {
                let last = complete && i + 1 == n;
                // Gemini reports running (cumulative) counts on every chunk.
                let u = if last {
                    usage
                } else {
                    usage.map(|b| Billing {
                        output: (i as u64 + 1).min(output),
                        reasoning: 0,
                        ..b
                    })
                };
                frames.push(sse(&gemini_chunk(d, last, u).to_string()));
            }
            if complete && n == 0 {
                frames.push(sse(&gemini_chunk("", true, usage).to_string()));
            }
        }
        Flavor::Ollama => {
            for d in deltas {
                frames.push(line(
                    json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": d}, "done": false}),
                ));
            }
            if complete {
                frames.push(line(json!({"model": model, "created_at": "2025-01-01T00:00:01Z",
                    "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
                    "prompt_eval_count": input, "eval_count": output})));
            }
        }
    }
    frames
}

/// A non-streamed answer.
fn whole(flavor: Flavor, model: &str, text: &str, usage: Option<Billing>) -> serde_json::Value {
    let billed = usage.unwrap_or_default();
    let (input, output) = (billed.input, billed.output);
    match flavor {
        Flavor::OpenAi => {
            let mut v = json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]});
            if usage.is_some() {
                v["usage"] = openai_usage(&billed);
            }
            v
        }
        Flavor::Anthropic => {
            json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": anthropic_usage(&billed, output)})
        }
        Flavor::Gemini => gemini_chunk(text, true, usage),
        Flavor::Ollama => json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text}, "done": true, "done_reason": "stop",
            "prompt_eval_count": input, "eval_count": output}),
    }
}

/// Text cut in three pieces (at character boundaries).
fn thirds(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |k: usize| chars.get(k * n / 3).map_or(text.len(), |(i, _)| *i);
    let (a, b) = (at(1), at(2));
    vec![&text[..a], &text[a..b], &text[b..]]
}

/// A stream of `frames` that breaks (after a moment, so that headers and frames reach the
/// client first) when `cut`.
fn maybe_cut(frames: Vec<Bytes>, cut: bool) -> Response<Body> {
    if cut {
        let cut = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::other("connection cut by the fake server"))
        });
        let body = futures::stream::iter(frames.into_iter().map(Ok)).chain(cut);
        return response(200, "text/event-stream", Body::from_stream(body));
    }
    let body = futures::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
    response(200, "text/event-stream", Body::from_stream(body))
}

/// Tool calls in Anthropic's format: `tool_use` blocks, streamed as `content_block_start`
/// then `input_json_delta` pieces.
fn anthropic_tool_calls(
    model: &str,
    calls: &[(String, String)],
    billed: Billing,
    cut: bool,
    stream: bool,
) -> Response<Body> {
    let output = billed.output;
    if !stream {
        let blocks: Vec<serde_json::Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                // A real answer's input is always an object; a test's broken arguments go
                // through as they are, as a string.
                let input = serde_json::from_str::<serde_json::Value>(args)
                    .unwrap_or_else(|_| serde_json::Value::String(args.clone()));
                json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": input})
            })
            .collect();
        let v = json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": "tool_use", "stop_sequence": null,
            "usage": anthropic_usage(&billed, output)});
        return response(200, "application/json", Body::from(v.to_string()));
    }
    let mut frames = vec![named(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
        "role": "assistant", "content": [], "model": model, "stop_reason": null,
        "usage": anthropic_usage(&billed, 1)}}),
    )];
    for (i, (name, args)) in calls.iter().enumerate() {
        frames.push(named("content_block_start", json!({"type": "content_block_start", "index": i,
            "content_block": {"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": {}}})));
        let last_call = i + 1 == calls.len();
        for (k, piece) in thirds(args).iter().enumerate() {
            if cut && last_call && k == 2 {
                return maybe_cut(frames, true);
            }
            frames.push(named(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        frames.push(named(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        ));
    }
    frames.push(named("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": output}})));
    frames.push(named("message_stop", json!({"type": "message_stop"})));
    maybe_cut(frames, false)
}

/// Arguments text as the JSON object Gemini and Ollama send (a test's broken arguments go
/// through as a string).
fn arguments_value(args: &str) -> serde_json::Value {
    serde_json::from_str(args).unwrap_or_else(|_| serde_json::Value::String(args.to_string()))
}

/// Tool calls in Gemini's or Ollama's format: each call whole, one chunk (line) per call,
/// then the finish (Gemini: `STOP` with usage on the last call's chunk; Ollama: a `done`
/// line). With `cut` the stream breaks before the last call.
fn whole_tool_calls(
    flavor: Flavor,
    model: &str,
    calls: &[(String, String)],
    billed: Billing,
    cut: bool,
    stream: bool,
) -> Response<Body> {
    let (input, output) = (billed.input, billed.output);
    let gemini = |calls: &[(String, String)], last: bool| {
        let parts: Vec<serde_json::Value> = calls
            .iter()
            .map(|(name, args)| json!({"functionCall": {"name": name, "args": arguments_value(args)}}))
            .collect();
        let mut c = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
        let mut v = json!({"modelVersion": "fake"});
        if last {
            c["finishReason"] = json!("STOP");
            v["usageMetadata"] = gemini_usage(&billed);
        }
        v["candidates"] = json!([c]);
        v
    };
    let ollama = |calls: &[(String, String)], done: bool| {
        let tool_calls: Vec<serde_json::Value> = calls
            .iter()
            .map(|(name, args)| json!({"function": {"name": name, "arguments": arguments_value(args)}}))
            .collect();
        let mut v = json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": "", "tool_calls": tool_calls}, "done": done});
        if done {
            v["done_reason"] = json!("stop");
            v["prompt_eval_count"] = json!(input);
            v["eval_count"] = json!(output);
        }
        v
    };
    if !stream {
        let v = if flavor == Flavor::Gemini {
            gemini(calls, true)
        } else {
            ollama(calls, true)
        };
        return response(200, "application/json", Body::from(v.to_string()));
    }
    let n = calls.len();
    let mut frames = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let last = i + 1 == n;
        if cut && last {
            break;
        }
        let one = std::slice::from_ref(call);
        frames.push(if flavor == Flavor::Gemini {
            sse(&gemini(one, last).to_string())
        } else {
            line(ollama(one, false))
        });
    }
    if flavor == Flavor::Ollama && !cut {
        frames.push(line(
            json!({"model": model, "created_at": "2025-01-01T00:00:01Z",
            "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
            "prompt_eval_count": input, "eval_count": output}),
        ));
    }
    let mut r = maybe_cut(frames, cut);
    if let Ok(v) = axum::http::HeaderValue::from_str(stream_content_type(flavor)) {
        r.headers_mut().insert(axum::http::header::CONTENT_TYPE, v);
    }
    r
}

/// An answer that calls tools, in each format.
fn tool_calls(
    flavor: Flavor,
    model: &str,
    calls: &[(String, String)],
    billed: Billing,
    cut: bool,
    stream: bool,
) -> Response<Body> {
    match flavor {
        Flavor::Anthropic => return anthropic_tool_calls(model, calls, billed, cut, stream),
        Flavor::Gemini | Flavor::Ollama => {
            return whole_tool_calls(flavor, model, calls, billed, cut, stream);
        }
        Flavor::OpenAi => {}
    }
    let usage = openai_usage(&billed);
    if !stream {
        let tool_calls: Vec<serde_json::Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                json!({"id": format!("call_{i}"), "type": "function",
                       "function": {"name": name, "arguments": args}})
            })
            .collect();
        let v = json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": tool_calls}, "finish_reason": "tool_calls"}],
            "usage": usage});
        return response(200, "application/json", Body::from(v.to_string()));
    }
    let mut frames = vec![sse(&openai_chunk(
        model,
        json!({"role": "assistant", "content": null}),
        None,
    ))];
    for (i, (name, args)) in calls.iter().enumerate() {
        frames.push(sse(&openai_chunk(
            model,
            json!({"tool_calls": [{"index": i, "id": format!("call_{i}"), "type": "function",
                   "function": {"name": name, "arguments": ""}}]}),
            None,
        )));
        let pieces = thirds(args);
        let last_call = i + 1 == calls.len();
        for (k, piece) in pieces.iter().enumerate() {
            if cut && last_call && k == 2 {
                return maybe_cut(frames, true);
            }
            frames.push(sse(&openai_chunk(
                model,
                json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                None,
            )));
        }
    }
    frames.push(sse(&openai_chunk(model, json!({}), Some("tool_calls"))));
    let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
        "choices": [], "usage": usage});
    frames.push(sse(&u.to_string()));
    frames.push(sse("[DONE]"));
    maybe_cut(frames, false)
}

fn stream_content_type(flavor: Flavor) -> &'static str {
    if flavor == Flavor::Ollama {
        "application/x-ndjson"
    } else {
        "text/event-stream"
    }
}

/// The tool an Anthropic request forces (`tool_choice: {"type": "tool", "name"}`): a model
/// made to call a tool answers through it, so the fake turns a scripted answer into that
/// tool's input (that is how a JSON answer comes back from Anthropic).
pub(crate) fn forced_tool(flavor: Flavor, request: &serde_json::Value) -> Option<String> {
    let choice = &request["tool_choice"];
    (flavor == Flavor::Anthropic && choice["type"] == "tool")
        .then(|| choice["name"].as_str().map(str::to_string))
        .flatten()
}

pub(crate) async fn render(
    flavor: Flavor,
    reply: Reply,
    stream: bool,
    model: &str,
    forced_tool: Option<String>,
) -> Response<Body> {
    // A billed answer is an answer with every class of usage.
    let (reply, billing) = match reply {
        Reply::Billed { deltas, billing } => (
            Reply::Answer {
                deltas,
                usage: Some((billing.input, billing.output)),
                done_marker: true,
                chunk_delay: Duration::ZERO,
            },
            Some(billing),
        ),
        Reply::Answer {
            deltas,
            usage,
            done_marker,
            chunk_delay,
        } => (
            Reply::Answer {
                deltas,
                usage,
                done_marker,
                chunk_delay,
            },
            usage.map(|(i, o)| Billing::plain(i, o)),
        ),
        Reply::ToolCalls { calls, usage, cut } => (
            Reply::ToolCalls { calls, usage, cut },
            Some(Billing::plain(usage.0, usage.1)),
        ),
        other => (other, None),
    };
    if let (Reply::Answer { deltas, .. }, Some(name)) = (&reply, forced_tool) {
        let calls = vec![(name, deltas.concat())];
        return tool_calls(
            flavor,
            model,
            &calls,
            billing.unwrap_or_default(),
            false,
            stream,
        );
    }
    match reply {
        Reply::Hang => {
            std::future::pending::<()>().await;
            response(500, "text/plain", Body::empty())
        }
        Reply::Status {
            status,
            body,
            headers,
        } => {
            let mut r = response(status, "application/json", Body::from(body));
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    axum::http::HeaderValue::from_str(&v),
                ) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        Reply::Answer {
            deltas,
            done_marker,
            chunk_delay,
            ..
        } if stream => {
            let frames = stream_frames(flavor, model, &deltas, billing, true, done_marker);
            let body = futures::stream::iter(frames).then(move |f| async move {
                if !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
                Ok::<_, std::io::Error>(f)
            });
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Answer { deltas, .. } => {
            let v = whole(flavor, model, &deltas.concat(), billing);
            response(200, "application/json", Body::from(v.to_string()))
        }
        Reply::RawStream(datas) => {
            let frames: Vec<Result<Bytes, std::io::Error>> =
                datas.iter().map(|d| Ok(sse(d))).collect();
            response(
                200,
                "text/event-stream",
                Body::from_stream(futures::stream::iter(frames)),
            )
        }
        Reply::Raw { content_type, body } => response(200, &content_type, Body::from(body)),
        Reply::Endless { delta } => {
            let frame = stream_frames(flavor, model, &[delta], None, false, false)
                .pop()
                .unwrap_or_default();
            let body = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(frame.clone()));
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Huge { status, bytes } => {
            const PIECE: usize = 64 * 1024;
            let head = if status == 200 { "data: " } else { "" };
            let pieces = std::iter::once(Bytes::from(head))
                .chain((0..bytes / PIECE).map(|_| Bytes::from(vec![b'x'; PIECE])));
            let body = futures::stream::iter(pieces.map(Ok::<_, std::io::Error>));
            let content_type = if status == 200 {
                stream_content_type(flavor)
            } else {
                "text/html"
            };
            response(status, content_type, Body::from_stream(body))
        }
        Reply::ToolCalls { calls, cut, .. } => tool_calls(
            flavor,
            model,
            &calls,
            billing.unwrap_or_default(),
            cut,
            stream,
        ),
        // Turned into an answer above.
        Reply::Billed { .. } => response(500, "text/plain", Body::empty()),
        // Vectors on a generation route: the test scripted the wrong endpoint.
        Reply::Vectors { .. } => response(
            400,
            "application/json",
            Body::from(r#"{"error":{"message":"not an embedding route"}}"#),
        ),
        Reply::Stall { deltas } => {
            let frames = stream_frames(flavor, model, &deltas, None, false, false);
            let body = futures::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>))
                .chain(futures::stream::pending());
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Cut { deltas } => {
            let frames = stream_frames(flavor, model, &deltas, None, false, false);
            // Let headers and chunks reach the client before the connection breaks (hyper
            // polls a ready body eagerly and would otherwise fail before sending headers).
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection cut by the fake server"))
            });
            let body = futures::stream::iter(frames.into_iter().map(Ok)).chain(cut);
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
    }
}
