//! The fake server's image generation: OpenAI's Images API (`POST /v1/images/generations`)
//! and Gemini's image output (`generateContent` asking for `IMAGE`), answered with real PNG
//! pictures ([`fake_png`]) whose pixels are drawn from the prompt, so a test can tell which
//! picture arrived. Scripted failures ([`crate::Reply::Status`], `Hang`, `Raw`) are played as
//! for text; [`crate::Reply::content_policy`] is OpenAI's refusal.

use axum::body::Body;
use axum::http::Response;
use serde_json::{Value, json};

use crate::Reply;
use crate::wire::{Flavor, render, response};

/// Width and height of every fake picture, whatever size was asked for.
pub const FAKE_PICTURE_SIDE: u32 = 16;

/// Output tokens the fake bills per gpt-image picture (gpt-image-1, medium, 1024x1024).
pub const FAKE_IMAGE_OUTPUT_TOKENS: u64 = 1056;

/// A 16x16 RGB PNG whose pixels come from the prompt (and the picture's index): a real PNG
/// any decoder reads.
pub fn fake_png(prompt: &str, index: usize) -> Vec<u8> {
    let side = FAKE_PICTURE_SIDE as usize;
    let mut h = format!("{index}:{prompt}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let mut next = move || {
        h ^= h << 13;
        h ^= h >> 7;
        h ^= h << 17;
        (h >> 24) as u8
    };
    // Each row: filter type 0 (none), then its RGB bytes.
    let raw: Vec<u8> = (0..side)
        .flat_map(|_| std::iter::once(0).chain((0..side * 3).map(|_| next()).collect::<Vec<_>>()))
        .collect();
    let mut ihdr = Vec::new();
    ihdr.extend(FAKE_PICTURE_SIDE.to_be_bytes());
    ihdr.extend(FAKE_PICTURE_SIDE.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend((data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend(kind);
    png.extend(data);
    let crc = crc32(&png[start..]);
    png.extend(crc.to_be_bytes());
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = data.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend(*block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffff_u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Answer an image request in the flavor's format: the scripted reply's failure, or
/// pictures.
pub(crate) async fn answer(
    reply: Option<Reply>,
    flavor: Flavor,
    request: &Value,
) -> Response<Body> {
    if let Some(
        other @ (Reply::Status { .. } | Reply::Hang | Reply::Raw { .. } | Reply::Huge { .. }),
    ) = reply
    {
        return render(flavor, other, false, "m", None).await;
    }
    let body = match flavor {
        Flavor::Gemini => {
            let prompt = request["contents"][0]["parts"][0]["text"]
                .as_str()
                .unwrap_or_default();
            let n = request["generationConfig"]["candidateCount"]
                .as_u64()
                .unwrap_or(1);
            let candidates: Vec<Value> = (0..n as usize)
                .map(|i| {
                    json!({"content": {"role": "model", "parts": [
                        {"text": "Here is your picture."},
                        {"inlineData": {"mimeType": "image/png", "data": b64(&fake_png(prompt, i))}}
                    ]}, "finishReason": "STOP", "index": i})
                })
                .collect();
            json!({"candidates": candidates, "usageMetadata": {
                "promptTokenCount": prompt_tokens(prompt),
                "candidatesTokenCount": 1290 * n,
                "totalTokenCount": prompt_tokens(prompt) + 1290 * n}})
        }
        _ => {
            let prompt = request["prompt"].as_str().unwrap_or_default();
            let model = request["model"].as_str().unwrap_or_default();
            let n = request["n"].as_u64().unwrap_or(1);
            let dall_e = model.starts_with("dall-e");
            let data: Vec<Value> = (0..n as usize)
                .map(|i| {
                    let mut item = json!({"b64_json": b64(&fake_png(prompt, i))});
                    if dall_e {
                        item["revised_prompt"] = json!(format!("{prompt}, in detail"));
                    }
                    item
                })
                .collect();
            let mut body = json!({"created": 1_700_000_000, "data": data});
            if !dall_e {
                // gpt-image models report usage in tokens, and what they made.
                let input = prompt_tokens(prompt);
                let output = FAKE_IMAGE_OUTPUT_TOKENS * n;
                body["usage"] = json!({"total_tokens": input + output, "input_tokens": input,
                    "output_tokens": output,
                    "input_tokens_details": {"text_tokens": input, "image_tokens": 0}});
                body["size"] = request.get("size").cloned().unwrap_or(json!("1024x1024"));
                body["quality"] = request.get("quality").cloned().unwrap_or(json!("medium"));
                body["output_format"] = json!("png");
            }
            body
        }
    };
    response(200, "application/json", Body::from(body.to_string()))
}

/// A token per 4 characters, as the worker estimates.
fn prompt_tokens(prompt: &str) -> u64 {
    (prompt.chars().count() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_pngs_that_differ_by_prompt() {
        let a = fake_png("a red fox", 0);
        assert!(a.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(&a[12..16], b"IHDR");
        assert_ne!(a, fake_png("a blue fox", 0));
        assert_ne!(a, fake_png("a red fox", 1));
        assert_eq!(a, fake_png("a red fox", 0));
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(b64(b"hello"), "aGVsbG8=");
        assert_eq!(b64(b"hi!"), "aGkh");
    }
}
