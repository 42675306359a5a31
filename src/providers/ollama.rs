//! Ollama's native API: `POST /api/chat` with NDJSON streaming (`stream` defaults to true),
//! usage from `prompt_eval_count` / `eval_count` on the `done: true` line (which may still carry
//! text), and `{"error": "..."}` bodies or lines, the latter also inside a 200 stream.

use std::collections::VecDeque;

use futures::StreamExt;
use reqwest::Url;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::helpers::{clip, lenient_count};
use super::{Call, EventStream, FinishReason, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::contract::ErrorCode;
use crate::contract::{GenerateRequest, Role};
use crate::error::{ProviderError, code_for_status};

pub(crate) struct Ollama {
    http: super::Http,
    url: Url,
    embed_url: Url,
}

impl Ollama {
    pub fn new(cfg: &ProviderConfig, http: super::Http) -> Result<Self, ProviderError> {
        let base = cfg.base_url.as_deref().unwrap_or("http://localhost:11434");
        let mut url = Url::parse(base)
            .map_err(|e| ProviderError::new(ErrorCode::BadRequest, format!("base_url: {e}")))?;
        let root = url.path().trim_end_matches('/').to_string();
        let mut embed_url = url.clone();
        embed_url.set_path(&format!("{root}/api/embed"));
        url.set_path(&format!("{root}/api/chat"));
        Ok(Self {
            http,
            url,
            embed_url,
        })
    }

    /// `POST /api/embed` with all inputs at once (the caller sizes batches).
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<super::Embedded, ProviderError> {
        #[derive(Serialize)]
        struct EmbedRequest<'a> {
            model: &'a str,
            input: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            dimensions: Option<u32>,
        }
        let body = EmbedRequest {
            model,
            input: inputs,
            dimensions,
        };
        let request = self.http.client.post(self.embed_url.clone()).json(&body);
        let (response, status) = self.http.send(request, classify).await?;
        let text = self.http.read_body(response).await?;
        #[derive(serde::Deserialize)]
        struct Body {
            embeddings: Vec<Vec<f32>>,
            prompt_eval_count: Option<u64>,
        }
        let parsed: Body = serde_json::from_str(&text).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable embeddings ({e}): {}", clip(&text)),
            )
        })?;
        Ok(super::Embedded {
            vectors: parsed.embeddings,
            input_tokens: parsed.prompt_eval_count,
            http_status: Some(status),
        })
    }

    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let request = self
            .http
            .client
            .post(self.url.clone())
            .json(&request_body(model, req));
        let (response, status) = self.http.send(request, classify).await?;
        Ok(Call {
            http_status: Some(status),
            // A non-streamed answer is one line holding the whole body.
            events: decode(response, self.http.line_or_body(req.stream)),
        })
    }
}

/// An `/api/chat` request.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<MessageIn<'a>>,
    /// Always explicit: Ollama streams unless told otherwise.
    stream: bool,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options<'a>,
}

#[derive(Serialize)]
struct MessageIn<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Options<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

impl Options<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.num_predict.is_none()
            && self.seed.is_none()
            && self.stop.is_empty()
    }
}

fn request_body<'a>(model: &'a str, req: &'a GenerateRequest) -> WireRequest<'a> {
    let system = req.system.as_deref().map(|content| MessageIn {
        role: "system",
        content,
    });
    let messages = system
        .into_iter()
        .chain(req.messages.iter().map(|m| MessageIn {
            role: match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                // Never sent: an Ollama entry is skipped for jobs with tools
                // (`providers::capabilities`).
                Role::Tool => "tool",
            },
            content: &m.content,
        }))
        .collect();
    let o = &req.options;
    WireRequest {
        model,
        messages,
        stream: req.stream,
        options: Options {
            temperature: o.temperature,
            top_p: o.top_p,
            num_predict: o.max_tokens,
            seed: o.seed,
            stop: &o.stop,
        },
    }
}

/// One NDJSON line of `/api/chat` (or the whole non-streamed answer).
#[derive(Deserialize)]
struct WireLine {
    /// Present when the server reports an error instead of an answer.
    error: Option<IgnoredAny>,
    message: Option<MessageOut>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    #[serde(default, deserialize_with = "lenient_count")]
    prompt_eval_count: u64,
    #[serde(default, deserialize_with = "lenient_count")]
    eval_count: u64,
}

#[derive(Deserialize)]
struct MessageOut {
    #[serde(default)]
    content: String,
}

/// Map a `done_reason` (absent on older servers: a plain stop).
fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        None | Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some(other) => FinishReason::other(other),
    }
}

/// Decoder state for one answer (a streamed NDJSON body or one JSON object).
#[derive(Default)]
struct Decoder {
    finished: bool,
}

impl Decoder {
    fn line(&mut self, line: &[u8]) -> Result<Vec<ProviderEvent>, ProviderError> {
        let v: WireLine = serde_json::from_slice(line).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!(
                    "undecodable line ({e}): {}",
                    clip(&String::from_utf8_lossy(line))
                ),
            )
        })?;
        if v.error.is_some() {
            return Err(classify(200, &String::from_utf8_lossy(line)));
        }
        let mut out = Vec::new();
        if let Some(message) = v.message
            && !message.content.is_empty()
        {
            out.push(ProviderEvent::Delta(message.content));
        }
        if v.done {
            out.push(ProviderEvent::Usage(Usage {
                input_tokens: v.prompt_eval_count,
                output_tokens: v.eval_count,
            }));
            out.push(ProviderEvent::Finish(finish(v.done_reason.as_deref())));
            self.finished = true;
        }
        Ok(out)
    }
}

/// NDJSON body -> events. A body that ends before a `done: true` line is truncated; a line
/// longer than `max_line` bytes fails the answer (`response_too_large`).
fn decode(response: reqwest::Response, max_line: usize) -> EventStream {
    decode_body(super::body_stream(response), max_line)
}

/// [`decode`] over any body (the fuzz targets feed it arbitrary bytes).
pub(crate) fn decode_body(body: super::sse::ByteStream, max_line: usize) -> EventStream {
    struct State {
        body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        buf: Vec<u8>,
        /// How much of `buf` is known to hold no newline.
        scanned: usize,
        queue: VecDeque<Result<ProviderEvent, ProviderError>>,
        decoder: Decoder,
        done: bool,
    }
    let state = State {
        body,
        buf: Vec::new(),
        scanned: 0,
        queue: VecDeque::new(),
        decoder: Decoder::default(),
        done: false,
    };
    futures::stream::unfold(state, move |mut s| async move {
        loop {
            // 1. Hand out decoded events; an error ends the stream.
            if let Some(item) = s.queue.pop_front() {
                if item.is_err() {
                    s.done = true;
                    s.queue.clear();
                }
                return Some((item, s));
            }
            // 2. Answer complete (or failed): stop reading the body.
            if s.done {
                return None;
            }
            // 3. Decode a complete buffered line.
            if let Some(pos) = s.buf[s.scanned..].iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = s.buf.drain(..=s.scanned + pos).collect();
                s.scanned = 0;
                let line = line.trim_ascii();
                if !line.is_empty() {
                    match s.decoder.line(line) {
                        Ok(evs) => s.queue.extend(evs.into_iter().map(Ok)),
                        Err(e) => s.queue.push_back(Err(e)),
                    }
                    s.done = s.decoder.finished;
                }
                continue;
            }
            s.scanned = s.buf.len();
            if s.buf.len() > max_line {
                let err = ProviderError::new(
                    ErrorCode::ResponseTooLarge,
                    format!(
                        "an NDJSON line is longer than {max_line} bytes (limits.max_line_bytes)"
                    ),
                );
                s.queue.push_back(Err(err));
                continue;
            }
            // 4. Read more.
            match s.body.next().await {
                Some(Ok(bytes)) => s.buf.extend_from_slice(&bytes),
                Some(Err(e)) => s.queue.push_back(Err(ProviderError::new(
                    ErrorCode::Truncated,
                    format!("stream broken before the answer finished: {e}"),
                ))),
                None => {
                    // A last line without its newline, then the end of the body.
                    let rest = std::mem::take(&mut s.buf);
                    let rest = rest.trim_ascii();
                    if !rest.is_empty() {
                        match s.decoder.line(rest) {
                            Ok(evs) => s.queue.extend(evs.into_iter().map(Ok)),
                            Err(e) => s.queue.push_back(Err(e)),
                        }
                    }
                    if !s.decoder.finished {
                        s.queue.push_back(Err(ProviderError::new(
                            ErrorCode::Truncated,
                            "stream ended before a done line",
                        )));
                    }
                    s.done = true;
                }
            }
        }
    })
    .boxed()
}

/// Classify `{"error": "..."}`.
pub(crate) fn classify(status: u16, body: &str) -> ProviderError {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let parsed = serde_json::from_str::<ErrorBody>(body).ok();
    let message = parsed.map(|b| b.error).unwrap_or_else(|| {
        if body.is_empty() {
            format!("HTTP {status}")
        } else {
            clip(body)
        }
    });
    let lower = message.to_ascii_lowercase();
    let code =
        if lower.contains("context") && (lower.contains("exceed") || lower.contains("too long")) {
            ErrorCode::ContextTooLong
        } else if lower.contains("not found") && status != 200 {
            ErrorCode::NotFound
        } else if status == 200 {
            ErrorCode::ServerError
        } else {
            code_for_status(status)
        };
    ProviderError::new(code, clip(&message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_reference_lines_including_text_on_the_done_line() {
        let mut d = Decoder::default();
        let a = d.line(br#"{"model":"llama3.2","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}"#).unwrap();
        let b = d.line(br#"{"model":"llama3.2","created_at":"2025-01-01T00:00:01Z","message":{"role":"assistant","content":"lo"},"done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":2}"#).unwrap();
        assert_eq!(a, vec![ProviderEvent::Delta("Hel".into())]);
        assert_eq!(
            b,
            vec![
                ProviderEvent::Delta("lo".into()),
                ProviderEvent::Usage(Usage {
                    input_tokens: 26,
                    output_tokens: 2
                }),
                ProviderEvent::Finish(FinishReason::Stop),
            ]
        );
        assert!(d.finished);
    }

    #[test]
    fn error_lines_and_bodies_are_classified() {
        let mut d = Decoder::default();
        assert_eq!(
            d.line(br#"{"error":"an unknown error was encountered"}"#)
                .err()
                .unwrap()
                .code,
            ErrorCode::ServerError
        );
        assert_eq!(
            classify(404, r#"{"error":"model 'x' not found"}"#).code,
            ErrorCode::NotFound
        );
        assert_eq!(classify(502, "").code, ErrorCode::ServerError);
    }

    #[test]
    fn requests_are_explicit_about_streaming_and_map_options() {
        let req = GenerateRequest {
            system: Some("s".into()),
            messages: vec![crate::contract::Message::text(Role::User, "u")],
            options: crate::contract::GenerateOptions {
                max_tokens: Some(7),
                seed: Some(3),
                ..Default::default()
            },
            stream: false,
            ..Default::default()
        };
        let body = serde_json::to_value(request_body("llama3.2", &req)).unwrap();
        assert_eq!(body["stream"], false);
        assert_eq!(body["options"]["num_predict"], 7);
        assert_eq!(body["options"]["seed"], 3);
        assert_eq!(body["messages"][0]["role"], "system");
    }

    #[test]
    fn absurd_numbers_are_read_as_zero_or_saturate_never_a_panic() {
        let mut d = Decoder::default();
        let out = d
            .line(br#"{"message":{"content":""},"done":true,"done_reason":"stop","prompt_eval_count":-1,"eval_count":18446744073709551615}"#)
            .unwrap();
        assert!(out.contains(&ProviderEvent::Usage(Usage {
            input_tokens: 0,
            output_tokens: u64::MAX
        })));
        let mut d = Decoder::default();
        let e = d
            .line(br#"{"done":true,"eval_count":1e400}"#)
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::MalformedResponse);
    }

    #[test]
    fn done_reasons_map_to_finish_reasons() {
        for (line, reason) in [
            (r#"{"done":true}"#, FinishReason::Stop),
            (
                r#"{"done":true,"done_reason":"length"}"#,
                FinishReason::Length,
            ),
            (
                r#"{"done":true,"done_reason":"Unload"}"#,
                FinishReason::Other("unload".into()),
            ),
        ] {
            let out = Decoder::default().line(line.as_bytes()).unwrap();
            assert_eq!(out.last(), Some(&ProviderEvent::Finish(reason)), "{line}");
        }
    }
}
