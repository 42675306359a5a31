//! Google Gemini (v1beta): `generateContent` / `streamGenerateContent?alt=sse`, the SSE decoder
//! (no event names, no sentinel, cumulative `usageMetadata`), and error mapping including
//! `RetryInfo.retryDelay` and per-day quota exhaustion.

use std::time::Duration;

use eventsource_stream::Event;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::helpers::clip;
use super::sse::{SseDecoder, Step};
use super::{Call, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::error::{ErrorCode, ProviderError, code_for_status};
use crate::job::{GenerateRequest, Role};

pub struct Gemini {
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
        let requests: Vec<Value> = inputs
            .iter()
            .map(|text| {
                let mut r = json!({"model": format!("models/{model}"), "content": {"parts": [{"text": text}]}});
                if let Some(d) = dimensions {
                    r["outputDimensionality"] = json!(d);
                }
                r
            })
            .collect();
        let mut builder = self
            .http
            .client
            .post(url)
            .json(&json!({"requests": requests}));
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
            let events = match serde_json::from_str::<Value>(&text) {
                Ok(v) => match d.response(&v) {
                    Ok(_) if !d.finished => vec![Err(ProviderError::new(
                        ErrorCode::Truncated,
                        "response has no finishReason",
                    ))],
                    Ok(evs) => evs.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                },
                Err(e) => vec![Err(ProviderError::new(
                    ErrorCode::MalformedResponse,
                    format!("undecodable response ({e}): {}", clip(&text)),
                ))],
            };
            Box::pin(futures::stream::iter(events))
        };
        Ok(Call {
            http_status: Some(status),
            events,
        })
    }
}

fn request_body(req: &GenerateRequest) -> Value {
    let contents: Vec<Value> = req
        .messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| {
            let role = if m.role == Role::Assistant {
                "model"
            } else {
                "user"
            };
            json!({"role": role, "parts": [{"text": m.content}]})
        })
        .collect();
    let o = &req.options;
    let mut config = serde_json::Map::new();
    if let Some(t) = o.temperature {
        config.insert("temperature".into(), json!(t));
    }
    if let Some(p) = o.top_p {
        config.insert("topP".into(), json!(p));
    }
    if let Some(m) = o.max_tokens {
        config.insert("maxOutputTokens".into(), json!(m));
    }
    if !o.stop.is_empty() {
        config.insert("stopSequences".into(), json!(o.stop));
    }
    let mut body = json!({"contents": contents});
    if let Some(system) = &req.system {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    body
}

#[derive(Default)]
pub struct StreamDecoder {
    finished: bool,
}

impl StreamDecoder {
    /// Decode one `GenerateContentResponse`.
    fn response(&mut self, v: &Value) -> Result<Vec<ProviderEvent>, ProviderError> {
        if v.get("error").is_some() {
            return Err(classify(200, &v.to_string()));
        }
        let mut out = Vec::new();
        let candidate = v.get("candidates").and_then(|c| c.get(0));
        if candidate.is_none()
            && let Some(reason) = v
                .pointer("/promptFeedback/blockReason")
                .and_then(|r| r.as_str())
        {
            return Err(ProviderError::new(
                ErrorCode::ContentFiltered,
                format!("the prompt was blocked (blockReason: {reason})"),
            ));
        }
        if let Some(parts) = candidate
            .and_then(|c| c.pointer("/content/parts"))
            .and_then(|p| p.as_array())
        {
            for part in parts {
                if part.get("thought").and_then(|t| t.as_bool()) == Some(true) {
                    continue;
                }
                if let Some(text) = part.get("text").and_then(|t| t.as_str())
                    && !text.is_empty()
                {
                    out.push(ProviderEvent::Delta(text.to_string()));
                }
            }
        }
        if let Some(u) = v.get("usageMetadata") {
            let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            out.push(ProviderEvent::Usage(Usage {
                input_tokens: n("promptTokenCount"),
                output_tokens: n("candidatesTokenCount").saturating_add(n("thoughtsTokenCount")),
            }));
        }
        if let Some(reason) = candidate
            .and_then(|c| c.get("finishReason"))
            .and_then(|r| r.as_str())
        {
            match reason {
                "STOP" => out.push(ProviderEvent::Finish("stop".into())),
                "MAX_TOKENS" => out.push(ProviderEvent::Finish("length".into())),
                "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII"
                | "IMAGE_SAFETY" => {
                    return Err(ProviderError::new(
                        ErrorCode::ContentFiltered,
                        format!("the answer was blocked (finishReason: {reason})"),
                    ));
                }
                other => out.push(ProviderEvent::Finish(other.to_ascii_lowercase())),
            }
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
        let v: Value = serde_json::from_str(&event.data).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable stream chunk ({e}): {}", clip(&event.data)),
            )
        })?;
        let out = self.response(&v)?;
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

/// Classify `{"error":{code,message,status,details}}` (sometimes wrapped in an array).
pub fn classify(status: u16, body: &str) -> ProviderError {
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    let v = if v.is_array() { v[0].clone() } else { v };
    let e = &v["error"];
    let message = e["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            if body.is_empty() {
                format!("HTTP {status}")
            } else {
                clip(body)
            }
        });
    let state = e["status"].as_str().unwrap_or_default();
    let details = e["details"].as_array().cloned().unwrap_or_default();
    let retry_delay = details
        .iter()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("RetryInfo"))
        })
        .find_map(|d| d["retryDelay"].as_str().and_then(parse_duration));
    let per_day = details.iter().any(|d| {
        d["violations"].as_array().is_some_and(|vs| {
            vs.iter()
                .any(|x| x["quotaId"].as_str().is_some_and(|q| q.contains("PerDay")))
        })
    });
    let lower = message.to_ascii_lowercase();
    let status = if status == 200 {
        e["code"].as_u64().unwrap_or(500) as u16
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
        let last = d.event(&ev(r#"{"candidates":[{"content":{"parts":[{"text":"thinking","thought":true},{"text":"done."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":4,"thoughtsTokenCount":3,"totalTokenCount":11}}"#)).unwrap();
        let Step::End(last) = last else {
            panic!("finished")
        };
        assert_eq!(
            last,
            vec![
                ProviderEvent::Delta("done.".into()),
                ProviderEvent::Usage(Usage {
                    input_tokens: 4,
                    output_tokens: 7
                }),
                ProviderEvent::Finish("stop".into()),
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
        assert!(out.contains(&ProviderEvent::Usage(Usage {
            input_tokens: 0,
            output_tokens: u64::MAX
        })));
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
}
