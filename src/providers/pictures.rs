//! What an image provider answers (CONTRACT.md section 8), whatever its protocol: the pictures
//! as bytes, checked to be pictures (media type and dimensions read from the bytes, never
//! taken from the provider's word) and bounded (`limits.max_generated_image_bytes`).

use base64::Engine as _;

use super::Usage;
use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// One picture a provider made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub bytes: Vec<u8>,
    /// The prompt the provider used when it rewrote the job's (dall-e-3).
    pub revised_prompt: Option<String>,
}

/// The answer to one image call.
#[derive(Debug, Clone, PartialEq)]
pub struct Pictures {
    pub pictures: Vec<Picture>,
    /// As reported; `None` when the provider reports no usage (it then bills per picture).
    pub usage: Option<Usage>,
    /// The size and quality made, as the provider reported them.
    pub size: Option<String>,
    pub quality: Option<String>,
    pub http_status: Option<u16>,
}

/// What the bytes of a picture say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Described {
    pub media_type: &'static str,
    pub extension: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Decode one base64 picture of at most `max` bytes (checked before decoding).
pub(crate) fn decode_b64(data: &str, max: usize) -> Result<Vec<u8>, ProviderError> {
    let data = data.trim();
    if data.len() / 4 * 3 > max.saturating_add(3) {
        return Err(ProviderError::new(
            ErrorCode::ResponseTooLarge,
            format!(
                "a picture of about {} bytes, more than the limit of {max} bytes (limits.max_generated_image_bytes)",
                data.len() / 4 * 3
            ),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("a picture that is not base64: {e}"),
            )
        })?;
    if bytes.len() > max {
        return Err(ProviderError::new(
            ErrorCode::ResponseTooLarge,
            format!(
                "a picture of {} bytes, more than the limit of {max} bytes (limits.max_generated_image_bytes)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Check an answer: at least one picture and at most `n`, each a PNG, JPEG, WebP or GIF.
pub(crate) fn check(answer: &Pictures, n: u32) -> Result<(), ProviderError> {
    let malformed = |m: String| Err(ProviderError::new(ErrorCode::MalformedResponse, m));
    if answer.pictures.is_empty() {
        return malformed("an image answer without a picture".into());
    }
    if answer.pictures.len() > n as usize {
        return malformed(format!(
            "{} pictures for a job that asked for {n}",
            answer.pictures.len()
        ));
    }
    for (i, p) in answer.pictures.iter().enumerate() {
        if describe(&p.bytes).is_none() {
            return malformed(format!(
                "picture {i} is not a PNG, JPEG, WebP or GIF image ({} bytes)",
                p.bytes.len()
            ));
        }
    }
    Ok(())
}

/// The media type and dimensions of a PNG, JPEG, WebP or GIF picture, read from its header;
/// `None` for anything else (or a header cut short).
pub fn describe(b: &[u8]) -> Option<Described> {
    let be16 = |i: usize| Some(u32::from(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])));
    let le16 = |i: usize| Some(u32::from(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?])));
    let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let le24 = |i: usize| {
        let s = b.get(i..i + 3)?;
        Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
    };
    let found = |media_type, extension, width: u32, height: u32| {
        (width > 0 && height > 0).then_some(Described {
            media_type,
            extension,
            width,
            height,
        })
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        if b.get(12..16)? != b"IHDR" {
            return None;
        }
        return found("image/png", "png", be32(16)?, be32(20)?);
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        // Walk the markers to the first start-of-frame.
        let mut i = 2;
        while i + 3 < b.len() {
            if b[i] != 0xFF {
                return None;
            }
            let marker = b[i + 1];
            if marker == 0xFF {
                i += 1;
                continue;
            }
            if matches!(marker, 0xD0..=0xD9 | 0x01) {
                i += 2;
                continue;
            }
            let is_frame = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
            if is_frame {
                return found("image/jpeg", "jpg", be16(i + 7)?, be16(i + 5)?);
            }
            i += 2 + be16(i + 2)? as usize;
        }
        return None;
    }
    if b.starts_with(b"RIFF") && b.get(8..12)? == b"WEBP" {
        return match b.get(12..16)? {
            b"VP8 " => {
                if b.get(23..26)? != [0x9d, 0x01, 0x2a] {
                    return None;
                }
                found("image/webp", "webp", le16(26)? & 0x3fff, le16(28)? & 0x3fff)
            }
            b"VP8L" => {
                if *b.get(20)? != 0x2f {
                    return None;
                }
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                found(
                    "image/webp",
                    "webp",
                    (bits & 0x3fff) + 1,
                    ((bits >> 14) & 0x3fff) + 1,
                )
            }
            b"VP8X" => found("image/webp", "webp", le24(24)? + 1, le24(27)? + 1),
            _ => None,
        };
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return found("image/gif", "gif", le16(6)?, le16(8)?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_give_media_type_and_dimensions() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(640u32.to_be_bytes());
        png.extend(480u32.to_be_bytes());
        let d = describe(&png).unwrap();
        assert_eq!((d.media_type, d.width, d.height), ("image/png", 640, 480));
        // JPEG: an APP0 segment, then a baseline frame of 300x200.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00,
            0xC8, 0x01, 0x2C, 0x03,
        ];
        let d = describe(&jpeg).unwrap();
        assert_eq!((d.media_type, d.width, d.height), ("image/jpeg", 300, 200));
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        webp.extend([0x3f, 0x01, 0x00, 0xef, 0x00, 0x00]);
        let d = describe(&webp).unwrap();
        assert_eq!((d.media_type, d.width, d.height), ("image/webp", 320, 240));
        let gif = b"GIF89a\x10\x00\x20\x00";
        assert_eq!(describe(gif).map(|d| (d.width, d.height)), Some((16, 32)));
        for junk in [
            &b""[..],
            b"\x89PNG\r\n\x1a\n",
            b"<html>",
            &[0xFF, 0xD8, 0x00, 0x01, 0x02],
        ] {
            assert_eq!(describe(junk), None);
        }
    }

    #[test]
    fn base64_pictures_are_bounded_before_and_after_decoding() {
        assert_eq!(decode_b64("aGVsbG8=", 5).unwrap(), b"hello");
        assert_eq!(
            decode_b64("aGVsbG8=", 4).unwrap_err().code,
            ErrorCode::ResponseTooLarge
        );
        assert_eq!(
            decode_b64(&"A".repeat(4000), 100).unwrap_err().code,
            ErrorCode::ResponseTooLarge
        );
        assert_eq!(
            decode_b64("not base64!", 100).unwrap_err().code,
            ErrorCode::MalformedResponse
        );
    }
}
