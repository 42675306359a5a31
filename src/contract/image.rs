//! Image jobs (CONTRACT.md section 8): what a job asks for ([`ImageRequest`]) and how its
//! result names the pictures kept in the JetStream object store ([`ImageObject`]).

use serde::{Deserialize, Serialize};

/// The object store bucket images are kept in (one object per image).
pub const IMAGES_BUCKET: &str = "LLM_IMAGES";

/// A validated image job's request, as every image provider takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    pub prompt: String,
    /// Images to make, 1 to `limits.max_generated_images`.
    pub n: u32,
    /// `WIDTHxHEIGHT` (`1024x1024`) or `auto`; `None`: the provider's default.
    pub size: Option<String>,
    /// `low`, `medium`, `high`, `auto` (gpt-image-1), `standard`, `hd` (dall-e-3).
    pub quality: Option<String>,
    pub output_format: ImageFormat,
    /// `transparent`, `opaque` or `auto`.
    pub background: Option<String>,
}

/// The encoding of the pictures a job asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The file extension of the stored objects.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }
}

/// One picture of an image job's result: where it is kept and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageObject {
    /// The object's name in `bucket`: `<job_id>/<index>.<ext>`.
    pub object: String,
    pub bucket: String,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    /// As the bytes say (`image/png`, `image/jpeg`, `image/webp`), not as the provider says.
    pub media_type: String,
    pub width: u32,
    pub height: u32,
    /// The prompt the provider actually used, when it rewrote it (dall-e-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
}

/// The object name of image `index` of job `job_id`.
pub fn image_object_name(job_id: &uuid::Uuid, index: usize, extension: &str) -> String {
    format!("{job_id}/{index}.{extension}")
}
