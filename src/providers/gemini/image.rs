//! Gemini image output: `generateContent` with `responseModalities: ["TEXT", "IMAGE"]`; the
//! pictures come back as `inlineData` parts (`inline_data` in the proto spelling, also taken),
//! usage in `usageMetadata` (output image tokens are candidate tokens). The size becomes an
//! aspect ratio (`imageConfig.aspectRatio`) when it is one Gemini knows; `n` pictures are
//! `candidateCount` candidates.

use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::super::helpers::clip;
use super::super::pictures::{Picture, Pictures, decode_b64};
use super::{Gemini, UsageMetadata, classify, finish};
use crate::contract::{ErrorCode, ImageRequest};
use crate::error::ProviderError;

/// Aspect ratios Gemini's image models take.
const RATIOS: [&str; 10] = [
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];

impl Gemini {
    pub async fn images(&self, model: &str, req: &ImageRequest) -> Result<Pictures, ProviderError> {
        let url = self.method_url(model, "generateContent")?;
        let mut builder = self.http.client.post(url).json(&request_body(req));
        if let Some(key) = &self.key {
            builder = builder.header("x-goog-api-key", key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify).await?;
        let text = self.http.read_pictures_body(response, req.n).await?;
        let mut answer = parse(&text, self.http.bounds.max_picture_bytes)?;
        answer.http_status = Some(status);
        Ok(answer)
    }
}

fn request_body(req: &ImageRequest) -> Value {
    let mut config = json!({"responseModalities": ["TEXT", "IMAGE"]});
    if req.n > 1 {
        config["candidateCount"] = json!(req.n);
    }
    if let Some(ratio) = req.size.as_deref().and_then(aspect_ratio) {
        config["imageConfig"] = json!({"aspectRatio": ratio});
    }
    json!({
        "contents": [{"role": "user", "parts": [{"text": req.prompt}]}],
        "generationConfig": config,
    })
}

/// `1536x1024` -> `3:2`, when the reduced ratio is one Gemini takes.
fn aspect_ratio(size: &str) -> Option<&'static str> {
    let (w, h) = crate::job::image_dimensions(size)?;
    let gcd = |mut a: u32, mut b: u32| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let g = gcd(w, h);
    let ratio = format!("{}:{}", w / g, h / g);
    RATIOS.into_iter().find(|r| *r == ratio)
}

fn parse(text: &str, max_picture_bytes: usize) -> Result<Pictures, ProviderError> {
    let malformed = |what: String| ProviderError::new(ErrorCode::MalformedResponse, what);
    let v: Value = serde_json::from_str(text)
        .map_err(|e| malformed(format!("undecodable response ({e}): {}", clip(text))))?;
    if v.get("error").is_some_and(|e| !e.is_null()) {
        return Err(classify(200, text));
    }
    let candidates = v["candidates"].as_array().cloned().unwrap_or_default();
    if candidates.is_empty()
        && let Some(reason) = v["promptFeedback"]["blockReason"].as_str()
    {
        return Err(ProviderError::new(
            ErrorCode::ContentFiltered,
            format!("the prompt was blocked (blockReason: {reason})"),
        ));
    }
    let mut pictures = Vec::new();
    let mut said = String::new();
    for c in &candidates {
        if let Some(reason) = c["finishReason"].as_str() {
            finish(reason)?;
        }
        for part in c["content"]["parts"].as_array().into_iter().flatten() {
            let inline = part.get("inlineData").or_else(|| part.get("inline_data"));
            if let Some(data) = inline.and_then(|i| i["data"].as_str()) {
                pictures.push(Picture {
                    bytes: decode_b64(data, max_picture_bytes)?,
                    revised_prompt: None,
                });
            } else if let Some(t) = part["text"].as_str()
                && part["thought"] != Value::Bool(true)
            {
                said.push_str(t);
            }
        }
    }
    if pictures.is_empty() {
        return Err(malformed(format!(
            "an answer without a picture; the model said: {}",
            clip(&said)
        )));
    }
    let usage = match v.get("usageMetadata") {
        Some(u) => serde_json::from_value::<UsageMetadata>(u.clone())
            .ok()
            .map(|u| u.usage().clamped()),
        None => None,
    };
    Ok(Pictures {
        pictures,
        usage,
        size: None,
        quality: None,
        http_status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_asks_for_images_and_the_answer_gives_inline_data() {
        let req = ImageRequest {
            prompt: "a red fox".into(),
            n: 1,
            size: Some("1536x1024".into()),
            quality: None,
            output_format: Default::default(),
            background: None,
        };
        let body = request_body(&req);
        assert_eq!(body["generationConfig"]["responseModalities"][1], "IMAGE");
        assert_eq!(
            body["generationConfig"]["imageConfig"]["aspectRatio"],
            "3:2"
        );
        assert_eq!(body["contents"][0]["parts"][0]["text"], "a red fox");
        assert_eq!(aspect_ratio("1000x333"), None);

        let ok = r#"{"candidates":[{"content":{"parts":[{"text":"Here it is"},{"inlineData":{"mimeType":"image/png","data":"aGVsbG8="}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":1290}}"#;
        let a = parse(ok, 100).unwrap();
        assert_eq!(a.pictures[0].bytes, b"hello");
        let u = a.usage.unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (7, 1290));
        let snake = r#"{"candidates":[{"content":{"parts":[{"inline_data":{"mime_type":"image/png","data":"aGVsbG8="}}]}}]}"#;
        assert_eq!(parse(snake, 100).unwrap().pictures.len(), 1);

        let blocked = r#"{"promptFeedback":{"blockReason":"SAFETY"}}"#;
        assert_eq!(
            parse(blocked, 100).unwrap_err().code,
            ErrorCode::ContentFiltered
        );
        let unsafe_image = r#"{"candidates":[{"finishReason":"IMAGE_SAFETY"}]}"#;
        assert_eq!(
            parse(unsafe_image, 100).unwrap_err().code,
            ErrorCode::ContentFiltered
        );
        let text_only = r#"{"candidates":[{"content":{"parts":[{"text":"I cannot draw that"}]},"finishReason":"STOP"}]}"#;
        let e = parse(text_only, 100).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedResponse);
        assert!(e.message.contains("I cannot draw that"), "{}", e.message);
    }
}
