//! OpenAI's Images API, `POST {base}/images/generations`, and every compatible server
//! (LocalAI, stable-diffusion front ends): the `gpt-image-*` models (always base64, usage in
//! image tokens), `dall-e-3` / `dall-e-2` (asked for `b64_json`; no usage: billed per
//! picture).
//!
//! Wire facts: the answer is `{"created", "data": [{"b64_json", "revised_prompt"}], "size",
//! "quality", "usage": {"input_tokens", "output_tokens", "input_tokens_details":
//! {"text_tokens", "image_tokens"}}}`; a refused prompt is a 400 with `error.code`
//! `content_policy_violation` (DALL-E) or `moderation_blocked` (gpt-image-1).

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::helpers::{clip, lenient_count};
use super::pictures::{Picture, Pictures, decode_b64};
use super::{Http, Usage};
use crate::contract::{ErrorCode, ImageRequest, TokenClasses};
use crate::error::ProviderError;

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    prompt: &'a str,
    n: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    background: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'static str>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    data: Vec<Item>,
    size: Option<String>,
    quality: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Item {
    b64_json: Option<String>,
    url: Option<String>,
    revised_prompt: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default, deserialize_with = "lenient_count")]
    input_tokens: u64,
    #[serde(default, deserialize_with = "lenient_count")]
    output_tokens: u64,
    input_tokens_details: Option<InputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    #[serde(default, deserialize_with = "lenient_count")]
    image_tokens: u64,
}

/// Whether the model is one of the DALL-E models (which answer with URLs unless asked for
/// base64, and know neither `background` nor `output_format`).
fn is_dall_e(model: &str) -> bool {
    model.starts_with("dall-e")
}

pub(super) async fn generate(
    http: &Http,
    url: &Url,
    key: Option<&SecretString>,
    model: &str,
    req: &ImageRequest,
) -> Result<Pictures, ProviderError> {
    let dall_e = is_dall_e(model);
    let body = Request {
        model,
        prompt: &req.prompt,
        n: req.n,
        size: req.size.as_deref(),
        quality: req.quality.as_deref(),
        background: req.background.as_deref().filter(|_| !dall_e),
        output_format: (!dall_e).then(|| req.output_format.as_str()),
        response_format: dall_e.then_some("b64_json"),
    };
    let mut builder = http.client.post(url.clone()).json(&body);
    if let Some(key) = key {
        builder = builder.bearer_auth(key.expose_secret());
    }
    let (response, status) = http
        .send(builder, super::openai::classify_error_body)
        .await?;
    let text = http.read_pictures_body(response, req.n).await?;
    let mut answer = parse(&text, http.bounds.max_picture_bytes)?;
    answer.http_status = Some(status);
    Ok(answer)
}

/// An Images API answer: every picture decoded (and bounded).
fn parse(text: &str, max_picture_bytes: usize) -> Result<Pictures, ProviderError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        ProviderError::new(
            ErrorCode::MalformedResponse,
            format!("undecodable image answer ({e}): {}", clip(text)),
        )
    })?;
    if value.get("error").is_some_and(|e| !e.is_null()) {
        return Err(super::openai::classify_error_body(200, text));
    }
    let answer: Answer = serde_json::from_value(value).map_err(|e| {
        ProviderError::new(
            ErrorCode::MalformedResponse,
            format!("undecodable image answer ({e}): {}", clip(text)),
        )
    })?;
    let mut pictures = Vec::with_capacity(answer.data.len());
    for item in answer.data {
        let Some(data) = item.b64_json else {
            let what = if item.url.is_some() {
                "a URL"
            } else {
                "nothing"
            };
            return Err(ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("a picture given as {what} instead of b64_json"),
            ));
        };
        pictures.push(Picture {
            bytes: decode_b64(&data, max_picture_bytes)?,
            revised_prompt: item.revised_prompt,
        });
    }
    let usage = answer.usage.map(|u| Usage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        classes: TokenClasses {
            image_input_tokens: u.input_tokens_details.map_or(0, |d| d.image_tokens),
            ..TokenClasses::default()
        },
    });
    Ok(Pictures {
        pictures,
        usage: usage.map(Usage::clamped),
        size: answer.size,
        quality: answer.quality,
        http_status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_decode_with_usage_and_refusals_are_content_filtered() {
        let ok = r#"{"created":1,"data":[{"b64_json":"aGVsbG8=","revised_prompt":"a fox"}],"size":"1024x1024","quality":"medium","usage":{"total_tokens":1100,"input_tokens":100,"output_tokens":1000,"input_tokens_details":{"text_tokens":90,"image_tokens":10}}}"#;
        let a = parse(ok, 100).unwrap();
        assert_eq!(a.pictures[0].bytes, b"hello");
        assert_eq!(a.pictures[0].revised_prompt.as_deref(), Some("a fox"));
        let u = a.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (100, 1000));
        assert_eq!(u.classes.image_input_tokens, 10);
        assert_eq!(a.size.as_deref(), Some("1024x1024"));
        // DALL-E reports no usage.
        let dalle = r#"{"created":1,"data":[{"b64_json":"aGVsbG8="}]}"#;
        assert_eq!(parse(dalle, 100).unwrap().usage, None);
        let url = r#"{"created":1,"data":[{"url":"https://x/y.png"}]}"#;
        assert_eq!(
            parse(url, 100).unwrap_err().code,
            ErrorCode::MalformedResponse
        );
        for code in ["content_policy_violation", "moderation_blocked"] {
            let body = format!(
                r#"{{"error":{{"code":"{code}","message":"Your request was rejected by the safety system.","type":"invalid_request_error"}}}}"#
            );
            let e = super::super::openai::classify_error_body(400, &body);
            assert_eq!(e.code, ErrorCode::ContentFiltered, "{code}");
        }
        assert_eq!(
            parse("<html>", 100).unwrap_err().code,
            ErrorCode::MalformedResponse
        );
    }

    #[test]
    fn dall_e_is_asked_for_base64_and_gpt_image_for_its_format() {
        let req = ImageRequest {
            prompt: "p".into(),
            n: 1,
            size: Some("1024x1024".into()),
            quality: None,
            output_format: crate::contract::ImageFormat::Webp,
            background: Some("transparent".into()),
        };
        let body = |model: &'static str| {
            let dall_e = is_dall_e(model);
            serde_json::to_value(Request {
                model,
                prompt: &req.prompt,
                n: req.n,
                size: req.size.as_deref(),
                quality: None,
                background: req.background.as_deref().filter(|_| !dall_e),
                output_format: (!dall_e).then(|| req.output_format.as_str()),
                response_format: dall_e.then_some("b64_json"),
            })
            .unwrap()
        };
        let d = body("dall-e-3");
        assert_eq!(d["response_format"], "b64_json");
        assert!(d.get("background").is_none() && d.get("output_format").is_none());
        let g = body("gpt-image-1");
        assert_eq!(g["output_format"], "webp");
        assert_eq!(g["background"], "transparent");
        assert!(g.get("response_format").is_none());
    }
}
