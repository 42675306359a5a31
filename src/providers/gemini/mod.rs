//! Google Gemini (v1beta): `generateContent` / `streamGenerateContent?alt=sse`, the SSE decoder
//! (no event names, no sentinel, cumulative `usageMetadata`), and error mapping including
//! `RetryInfo.retryDelay` and per-day quota exhaustion. A `functionCall` part arrives whole
//! (Gemini does not stream a call's arguments in pieces).
//!
//! `request` builds the request, rich jobs included; `image` asks for pictures.

mod image;
mod request;

use request::{PartIn, SystemIn, request_body};

use std::time::Duration;

use eventsource_stream::Event;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::helpers::{clip, lenient_count};
use super::sse::{SseDecoder, Step};
use super::{Call, FinishReason, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::contract::{ErrorCode, TokenClasses};
use crate::contract::{GenerateRequest, ToolCallChunk};
use crate::error::{ProviderError, code_for_status};

pub(crate) struct Gemini {
    http: super::Http,
    base: Url,
    key: Option<SecretString>,
}

impl Gemini {
    pub fn new(cfg: &ProviderConfig, http: super::Http) -> Result<Self, ProviderError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or("https://generativelanguage.googleapis.com");
        let mut base = Url::parse(base)
            .map_err(|e| ProviderError::new(ErrorCode::BadRequest, format!("base_url: {e}")))?;
        if base.path() == "/" || base.path().is_empty() {
            base.set_path("/v1beta");
        }
        Ok(Self {
            http,
            base,
            key: cfg.api_key.clone(),
        })
    }

    /// `{base}/models/{model}:{method}`. The model is one path segment, percent-encoded (a `/`
    /// in it cannot reach another endpoint); a leading `models/` is the resource prefix.
    fn method_url(&self, model: &str, method: &str) -> Result<Url, ProviderError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ProviderError::new(ErrorCode::BadRequest, "base_url cannot take a path"))?
            .pop_if_empty()
            .push("models")
            .push(&format!("{model}:{method}"));
        Ok(url)
    }

    fn url(&self, model: &str, stream: bool) -> Result<Url, ProviderError> {
        if !stream {
            return self.method_url(model, "generateContent");
        }
        let mut url = self.method_url(model, "streamGenerateContent")?;
        url.set_query(Some("alt=sse"));
        Ok(url)
    }

    /// `:batchEmbedContents` (the caller keeps batches within 100 inputs). No usage is reported.
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<super::Embedded, ProviderError> {
        let url = self.method_url(model, "batchEmbedContents")?;
        #[derive(Serialize)]
        struct Batch<'a> {
            requests: Vec<EmbedRequest<'a>>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct EmbedRequest<'a> {
            model: &'a str,
            content: SystemIn<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            output_dimensionality: Option<u32>,
        }
        let name = format!("models/{model}");
        let requests = inputs
            .iter()
            .map(|text| EmbedRequest {
                model: &name,
                content: SystemIn {
                    parts: [PartIn { text }],
                },
                output_dimensionality: dimensions,
            })
            .collect();
        let mut builder = self.http.client.post(url).json(&Batch { requests });
        if let Some(key) = &self.key {
            builder = builder.header("x-goog-api-key", key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify).await?;
        let text = self.http.read_body(response).await?;
        #[derive(serde::Deserialize)]
        struct Values {
            values: Vec<f32>,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            embeddings: Vec<Values>,
        }
        let parsed: Body = serde_json::from_str(&text).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable embeddings ({e}): {}", clip(&text)),
            )
        })?;
        Ok(super::Embedded {
            vectors: parsed.embeddings.into_iter().map(|e| e.values).collect(),
            input_tokens: None,
            http_status: Some(status),
        })
    }

    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let mut builder = self
            .http
            .client
            .post(self.url(model, req.stream)?)
            .json(&request_body(req));
        if let Some(key) = &self.key {
            builder = builder.header("x-goog-api-key", key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify).await?;
        let events = if req.stream {
            self.http.sse(response, StreamDecoder::default())
        } else {
            let text = self.http.read_body(response).await?;
            let mut d = StreamDecoder::default();
            let events = match d.response(&text) {
                Ok(_) if !d.finished => vec![Err(ProviderError::new(
                    ErrorCode::Truncated,
                    "response has no finishReason",
                ))],
                Ok(evs) => evs.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            Box::pin(futures::stream::iter(events))
        };
        Ok(Call {
            http_status: Some(status),
            events,
        })
    }
}

/// One `GenerateContentResponse` (a whole answer, or one streamed chunk of it).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    /// Present when a 200 stream carries an error instead of an answer.
    error: Option<IgnoredAny>,
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<ContentOut>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ContentOut {
    #[serde(default)]
    parts: Vec<PartOut>,
}

/// A part of an answer: text (thoughts are skipped), a whole function call, or kinds we do
/// not use.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartOut {
    text: Option<String>,
    #[serde(default)]
    thought: bool,
    function_call: Option<FunctionCallOut>,
}

#[derive(Deserialize)]
struct FunctionCallOut {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

/// Running (cumulative) counts.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default, deserialize_with = "lenient_count")]
    prompt_token_count: u64,
    #[serde(default, deserialize_with = "lenient_count")]
    candidates_token_count: u64,
    #[serde(default, deserialize_with = "lenient_count")]
    thoughts_token_count: u64,
    /// Part of `promptTokenCount` (implicit or explicit context caching).
    #[serde(default, deserialize_with = "lenient_count")]
    cached_content_token_count: u64,
    /// `promptTokenCount` by modality.
    #[serde(default)]
    prompt_tokens_details: Vec<ModalityCount>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModalityCount {
    #[serde(default)]
    modality: String,
    #[serde(default, deserialize_with = "lenient_count")]
    token_count: u64,
}

impl UsageMetadata {
    /// Output is the answer plus the thoughts (billed as output, counted apart).
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_token_count,
            output_tokens: self
                .candidates_token_count
                .saturating_add(self.thoughts_token_count),
            classes: TokenClasses {
                cache_read_tokens: self.cached_content_token_count,
                reasoning_tokens: self.thoughts_token_count,
                image_input_tokens: self
                    .prompt_tokens_details
                    .iter()
                    .filter(|m| m.modality == "IMAGE")
                    .map(|m| m.token_count)
                    .fold(0, u64::saturating_add),
                ..TokenClasses::default()
            },
        }
    }
}

/// Map a `finishReason` to a finish reason, or to the error it really is.
fn finish(reason: &str) -> Result<FinishReason, ProviderError> {
    match reason {
        "STOP" => Ok(FinishReason::Stop),
        "MAX_TOKENS" => Ok(FinishReason::Length),
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            Err(ProviderError::new(
                ErrorCode::ContentFiltered,
                format!("the answer was blocked (finishReason: {reason})"),
            ))
        }
        other => Ok(FinishReason::other(other)),
    }
}

#[derive(Default)]
pub(crate) struct StreamDecoder {
    finished: bool,
    /// Function calls so far (numbered across chunks).
    calls: u32,
}

impl StreamDecoder {
    /// Decode one `GenerateContentResponse` (`text` is its JSON).
    fn response(&mut self, text: &str) -> Result<Vec<ProviderEvent>, ProviderError> {
        let v: WireResponse = serde_json::from_str(text).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable response ({e}): {}", clip(text)),
            )
        })?;
        if v.error.is_some() {
            return Err(classify(200, text));
        }
        let mut out = Vec::new();
        let candidate = v.candidates.into_iter().next();
        if candidate.is_none()
            && let Some(reason) = v.prompt_feedback.and_then(|f| f.block_reason)
        {
            return Err(ProviderError::new(
                ErrorCode::ContentFiltered,
                format!("the prompt was blocked (blockReason: {reason})"),
            ));
        }
        let (content, reason) = candidate.map_or((None, None), |c| (c.content, c.finish_reason));
        for part in content.map(|c| c.parts).unwrap_or_default() {
            if let Some(call) = part.function_call {
                let index = self.calls;
                self.calls += 1;
                out.push(ProviderEvent::ToolCall(ToolCallChunk {
                    index,
                    id: Some(call.id.unwrap_or_else(|| format!("call_{index}"))),
                    name: Some(call.name),
                    arguments: call.args.map(|a| a.to_string()).unwrap_or_default(),
                }));
            } else if let Some(text) = part.text
                && !part.thought
                && !text.is_empty()
            {
                out.push(ProviderEvent::Delta(text));
            }
        }
        if let Some(u) = v.usage_metadata {
            out.push(ProviderEvent::Usage(u.usage()));
        }
        if let Some(reason) = reason {
            // Gemini says `STOP` when the model called functions.
            let reason = match finish(&reason)? {
                FinishReason::Stop if self.calls > 0 => FinishReason::ToolCalls,
                other => other,
            };
            out.push(ProviderEvent::Finish(reason));
            self.finished = true;
        }
        Ok(out)
    }
}

impl SseDecoder for StreamDecoder {
    fn event(&mut self, event: &Event) -> Result<Step, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(Step::More(Vec::new()));
        }
        let out = self.response(&event.data)?;
        // Usage rides on the chunk with the finish reason; nothing follows it.
        Ok(if self.finished {
            Step::End(out)
        } else {
            Step::More(out)
        })
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

/// `{"error": {...}}`: an error response, or an error inside a 200 stream.
#[derive(Deserialize)]
struct ErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    message: Option<String>,
    /// The canonical status name (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...).
    status: Option<String>,
    /// The HTTP status the error stands for (what matters inside a 200 stream).
    #[serde(default, deserialize_with = "lenient_count")]
    code: u64,
    #[serde(default)]
    details: Vec<Detail>,
}

/// One `google.rpc` detail: `RetryInfo` (a delay) or `QuotaFailure` (violations); others
/// are kept only by type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    #[serde(rename = "@type", default)]
    kind: String,
    retry_delay: Option<String>,
    #[serde(default)]
    violations: Vec<Violation>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Violation {
    #[serde(default)]
    quota_id: String,
}

/// Classify `{"error":{code,message,status,details}}` (sometimes wrapped in an array). A body
/// of another shape keeps the HTTP status and is quoted (clipped).
pub(crate) fn classify(status: u16, body: &str) -> ProviderError {
    let parsed = if body.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<ErrorBody>>(body)
            .ok()
            .and_then(|v| v.into_iter().next())
    } else {
        serde_json::from_str::<ErrorBody>(body).ok()
    };
    let e = parsed.map(|b| b.error);
    let message = e
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| {
            if body.is_empty() {
                format!("HTTP {status}")
            } else {
                clip(body)
            }
        });
    let state = e
        .as_ref()
        .and_then(|e| e.status.as_deref())
        .unwrap_or_default();
    let details = e.as_ref().map(|e| e.details.as_slice()).unwrap_or_default();
    let retry_delay = details
        .iter()
        .filter(|d| d.kind.ends_with("RetryInfo"))
        .find_map(|d| d.retry_delay.as_deref().and_then(parse_duration));
    let per_day = details
        .iter()
        .any(|d| d.violations.iter().any(|v| v.quota_id.contains("PerDay")));
    let lower = message.to_ascii_lowercase();
    let status = if status == 200 {
        e.as_ref()
            .and_then(|e| u16::try_from(e.code).ok())
            .filter(|c| *c != 0)
            .unwrap_or(500)
    } else {
        status
    };
    let code = if lower.contains("input token count") && lower.contains("exceeds the maximum") {
        ErrorCode::ContextTooLong
    } else if status == 429 && per_day {
        ErrorCode::QuotaExhausted
    } else if state == "UNAVAILABLE" {
        ErrorCode::Overloaded
    } else {
        code_for_status(status)
    };
    ProviderError::new(code, clip(&message)).with_retry_after(retry_delay)
}

/// `"34s"` / `"1.5s"` (protobuf Duration JSON).
fn parse_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
    super::hint_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Role;

    fn ev(data: &str) -> Event {
        Event {
            event: "message".into(),
            data: data.into(),
            id: String::new(),
            retry: None,
        }
    }

    #[test]
    fn decodes_the_reference_transcript_and_takes_the_last_usage() {
        let mut d = StreamDecoder::default();
        let first = d.event(&ev(r#"{"candidates":[{"content":{"parts":[{"text":"Okay, "}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2,"totalTokenCount":6},"modelVersion":"gemini-2.5-flash"}"#)).unwrap();
        let Step::More(first) = first else {
            panic!("not finished yet")
        };
        assert_eq!(first[0], ProviderEvent::Delta("Okay, ".into()));
        let last = d.event(&ev(r#"{"candidates":[{"content":{"parts":[{"text":"thinking","thought":true},{"text":"done."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":4,"thoughtsTokenCount":3,"cachedContentTokenCount":2,"promptTokensDetails":[{"modality":"TEXT","tokenCount":3},{"modality":"IMAGE","tokenCount":1}],"cacheTokensDetails":[{"modality":"TEXT","tokenCount":2}],"totalTokenCount":11}}"#)).unwrap();
        let Step::End(last) = last else {
            panic!("finished")
        };
        assert_eq!(
            last,
            vec![
                ProviderEvent::Delta("done.".into()),
                ProviderEvent::Usage(Usage {
                    input_tokens: 4,
                    output_tokens: 7,
                    classes: TokenClasses {
                        cache_read_tokens: 2,
                        reasoning_tokens: 3,
                        image_input_tokens: 1,
                        ..TokenClasses::default()
                    },
                }),
                ProviderEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn blocked_prompts_and_safety_stops_are_content_filtered() {
        let mut d = StreamDecoder::default();
        let e = d
            .event(&ev(r#"{"promptFeedback":{"blockReason":"SAFETY"}}"#))
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::ContentFiltered);
        let e = d
            .event(&ev(r#"{"candidates":[{"finishReason":"SAFETY"}]}"#))
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::ContentFiltered);
    }

    #[test]
    fn errors_carry_retry_delay_and_per_day_quotas_are_not_retried() {
        let body = r#"[{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34s"}]}}]"#;
        let e = classify(429, body);
        assert_eq!(
            (e.code, e.retry_after),
            (ErrorCode::RateLimited, Some(Duration::from_secs(34)))
        );
        let body = r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}"#;
        assert_eq!(classify(429, body).code, ErrorCode::QuotaExhausted);
        let body = r#"{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(classify(400, body).code, ErrorCode::ContextTooLong);
        let body =
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#;
        assert_eq!(classify(503, body).code, ErrorCode::Overloaded);
    }

    #[test]
    fn options_go_in_the_generation_config() {
        let req = GenerateRequest {
            system: None,
            messages: vec![crate::contract::Message::text(Role::User, "u")],
            options: crate::contract::GenerateOptions {
                max_tokens: Some(9),
                seed: Some(11),
                ..Default::default()
            },
            stream: true,
            ..Default::default()
        };
        let body = serde_json::to_value(request_body(&req)).unwrap();
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 9);
        assert_eq!(body["generationConfig"]["seed"], 11);
    }

    #[test]
    fn urls_follow_the_v1beta_layout() {
        let cfg = crate::config::Config::from_toml(
            "[providers.g]\ntype = \"gemini\"\nbase_url = \"http://127.0.0.1:9\"\ndefault_model = \"m\"\n",
        )
        .unwrap();
        let http = crate::providers::Http {
            client: crate::providers::http_client(Duration::from_secs(1)).unwrap(),
            bounds: Default::default(),
        };
        let g = Gemini::new(&cfg.providers["g"], http).unwrap();
        assert_eq!(
            g.url("gemini-2.5-flash", true).unwrap().as_str(),
            "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            g.url("models/m", false).unwrap().path(),
            "/v1beta/models/m:generateContent"
        );
        // A model can never leave its path segment, whatever validation let through.
        let tricky = g.url("x/../../v1alpha/models/y", false).unwrap();
        assert_eq!(
            tricky.path(),
            "/v1beta/models/x%2F..%2F..%2Fv1alpha%2Fmodels%2Fy:generateContent"
        );
    }

    #[test]
    fn absurd_numbers_and_delays_saturate_or_clamp_never_a_panic() {
        let mut d = StreamDecoder::default();
        let huge = r#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":-4,"candidatesTokenCount":18446744073709551615,"thoughtsTokenCount":18446744073709551615}}"#;
        let out = match d.event(&ev(huge)).unwrap() {
            Step::More(v) | Step::End(v) => v,
        };
        assert!(out.iter().any(|e| matches!(e, ProviderEvent::Usage(u)
            if u.input_tokens == 0 && u.output_tokens == u64::MAX)));
        for delay in ["1e20s", "1e400s", "-1s", "NaNs", "infs"] {
            let body = format!(
                r#"{{"error":{{"code":429,"message":"slow","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
            );
            let e = classify(429, &body);
            assert!(
                e.retry_after
                    .is_none_or(|d| d <= crate::providers::MAX_RETRY_HINT),
                "{delay}"
            );
        }
        let _ = classify(200, r#"{"error":{"code":1e300}}"#);
        let _ = classify(200, r#"{"error":{"code":-1}}"#);
    }

    #[test]
    fn a_rich_request_has_inline_data_function_parts_and_a_json_schema_config() {
        use crate::contract::{Message, ResponseFormat, ToolChoice};
        use crate::providers::fixtures::{tool_turn, weather_schema};
        use serde_json::json;
        let schema = weather_schema();
        let mut req = tool_turn("21 degrees");
        req.messages.push(Message::text(Role::User, "Thanks."));
        req.tool_choice = Some(ToolChoice::Named("get_weather".into()));
        req.response_format = Some(ResponseFormat::JsonSchema {
            name: "w".into(),
            schema: schema.clone(),
            strict: true,
        });
        let body = serde_json::to_value(request_body(&req)).unwrap();
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Weather where this is?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
                {"role": "model", "parts": [{"functionCall":
                    {"id": "call_0", "name": "get_weather", "args": {"city": "Paris"}}}]},
                {"role": "user", "parts": [
                    {"functionResponse": {"id": "call_0", "name": "get_weather",
                        "response": {"content": "21 degrees"}}},
                    {"text": "Thanks."}]}
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"functionDeclarations": [{"name": "get_weather",
                "description": "Current weather", "parametersJsonSchema": schema}]}])
        );
        assert_eq!(
            body["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        assert_eq!(
            body["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(body["generationConfig"]["responseJsonSchema"], schema);
    }

    #[test]
    fn function_calls_arrive_whole_and_a_stop_with_calls_is_tool_calls() {
        let mut d = StreamDecoder::default();
        let out = d
            .response(r#"{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"get_weather","args":{"city":"Paris"}}},{"functionCall":{"id":"g1","name":"get_time"}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":20,"candidatesTokenCount":7}}"#)
            .unwrap();
        assert_eq!(
            out[0],
            crate::providers::fixtures::whole_call(
                0,
                "call_0",
                "get_weather",
                r#"{"city":"Paris"}"#
            )
        );
        assert_eq!(
            out[1],
            crate::providers::fixtures::whole_call(1, "g1", "get_time", "")
        );
        assert_eq!(
            out.last(),
            Some(&ProviderEvent::Finish(FinishReason::ToolCalls))
        );
    }
}
