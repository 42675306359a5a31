//! The pictures of image jobs in the JetStream object store (`LLM_IMAGES`, CONTRACT.md section
//! 8): the bucket created like the other streams (replicas, and kept as long as results), one
//! object per picture named `<job_id>/<index>.<ext>`, and what a redelivered job finds there.
//!
//! Every picture's object carries the job's result in its metadata (`result`): the result is
//! complete before the first picture is put, and stored in `LLM_RESULTS` only after the last
//! one. A job redelivered after its pictures were put (its worker died before storing the
//! result) is answered from that copy without calling a provider again, once every picture
//! it names is found whole (size and digest). An object put only in part has no metadata
//! message yet (the client publishes it after the last chunk), so it is not found, and the
//! job is made again; the new put replaces it whole. (Replacing an object purges its older
//! chunks, which a least-privilege worker may not do: they are then left to age out.)

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    object_store::{ObjectInfo, ObjectMetadata, ObjectStore, PutErrorKind},
    stream::{self, DiscardPolicy, StorageType},
};
use base64::Engine as _;
use tokio::io::AsyncReadExt as _;

use crate::config::NatsConfig;
use crate::contract::{ImageObject, JobKind, ResultEvent};

/// The metadata key of the result copy on every picture.
const RESULT_KEY: &str = "result";

/// Extensions a job's first picture may have (the bytes decide it).
const EXTENSIONS: [&str; 4] = ["png", "jpg", "webp", "gif"];

/// The deployment's picture bucket.
#[derive(Clone)]
pub struct ImageStore {
    store: ObjectStore,
    bucket: String,
}

impl ImageStore {
    /// Create the bucket if it is missing (as the other streams: `nats.replicas`, kept
    /// `nats.results_max_age_secs`) and open it.
    pub async fn open(js: &jetstream::Context, nats: &NatsConfig) -> Result<Self, String> {
        let bucket = &nats.images_bucket;
        // The stream async-nats' `create_object_store` makes, through `ensure_stream` so an
        // existing one that differs is named in a warning.
        let config = stream::Config {
            name: format!("OBJ_{bucket}"),
            description: Some("llm-worker: pictures of image jobs".into()),
            subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
            max_age: Duration::from_secs(nats.results_max_age_secs),
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            ..Default::default()
        };
        crate::nats::ensure_stream(js, config, nats.replicas)
            .await
            .map_err(|e| format!("creating the picture bucket {bucket}: {e}"))?;
        Self::existing(js, bucket).await
    }

    /// Open an existing bucket (clients: nothing is created).
    pub async fn existing(js: &jetstream::Context, bucket: &str) -> Result<Self, String> {
        let store = js
            .get_object_store(bucket)
            .await
            .map_err(|e| format!("opening the picture bucket {bucket}: {e}"))?;
        Ok(Self {
            store,
            bucket: bucket.to_string(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Put one picture, with `result` (the job's result JSON) in its metadata.
    pub async fn put(&self, name: &str, bytes: &[u8], result: &str) -> Result<(), String> {
        let meta = ObjectMetadata {
            name: name.to_string(),
            description: Some("llm-worker picture".into()),
            metadata: HashMap::from([(RESULT_KEY.to_string(), result.to_string())]),
            ..Default::default()
        };
        let mut reader = bytes;
        match self.store.put(meta, &mut reader).await {
            Ok(_) => Ok(()),
            // The new version is complete; only an older version's chunks could not be
            // purged (a worker may not purge, `crate::nats_account`): they age out.
            Err(e) if e.kind() == PutErrorKind::PurgeOldChunks => {
                tracing::debug!(object = name, error = %e, "older chunks left to age out");
                Ok(())
            }
            Err(e) => Err(format!("putting {name} in {}: {e}", self.bucket)),
        }
    }

    /// The result stored with the pictures of an earlier run of job `job_id` of `tenant`,
    /// when every picture it names is there whole; `Ok(None)` when there is none (or only a
    /// part, or another tenant's).
    pub async fn earlier_result(
        &self,
        job_id: &uuid::Uuid,
        tenant: &str,
    ) -> Result<Option<ResultEvent>, String> {
        let mut first = None;
        for ext in EXTENSIONS {
            if let Some(info) = self.info(&format!("{job_id}/0.{ext}")).await? {
                first = Some(info);
                break;
            }
        }
        let Some(text) = first.and_then(|i| i.metadata.get(RESULT_KEY).cloned()) else {
            return Ok(None);
        };
        let Ok(result) = serde_json::from_str::<ResultEvent>(&text) else {
            return Ok(None);
        };
        if result.job_id != *job_id || result.tenant != tenant || result.job_kind != JobKind::Image
        {
            return Ok(None);
        }
        for image in result.images.iter().flatten() {
            match self.info(&image.object).await? {
                Some(info) if whole(&info, image) => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(result))
    }

    /// An object's description, `None` when it does not exist (or was deleted).
    pub async fn info(&self, name: &str) -> Result<Option<ObjectInfo>, String> {
        use async_nats::jetstream::object_store::InfoErrorKind;
        match self.store.info(name).await {
            Ok(info) if info.deleted => Ok(None),
            Ok(info) => Ok(Some(info)),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {name} in {}: {e}", self.bucket)),
        }
    }

    /// An object as a reader of its bytes (streamed from the bucket, its digest checked at
    /// the end by async-nats); `None` when it does not exist.
    pub async fn reader(
        &self,
        name: &str,
    ) -> Result<Option<async_nats::jetstream::object_store::Object>, String> {
        use async_nats::jetstream::object_store::GetErrorKind;
        match self.store.get(name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.kind() == GetErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {name} in {}: {e}", self.bucket)),
        }
    }

    /// An object's bytes, at most `max`; `None` when it does not exist.
    pub async fn read(&self, name: &str, max: usize) -> Result<Option<Vec<u8>>, String> {
        let Some(mut object) = self.reader(name).await? else {
            return Ok(None);
        };
        if object.info().size > max {
            return Err(format!(
                "{name} is {} bytes, more than {max}",
                object.info().size
            ));
        }
        let mut bytes = Vec::with_capacity(object.info().size);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| format!("reading {name} in {}: {e}", self.bucket))?;
        Ok(Some(bytes))
    }
}

/// Whether a stored object is the picture a result names: its size and digest.
fn whole(info: &ObjectInfo, image: &ImageObject) -> bool {
    info.size as u64 == image.bytes
        && info.digest.as_deref() == digest_of_hex(&image.sha256).as_deref()
}

/// The object store's digest text (`SHA-256=<base64url>`) of a hex SHA-256.
fn digest_of_hex(hex: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    Some(format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(bytes?)
    ))
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hex_digest_becomes_the_object_stores_digest_text() {
        let hex = sha256_hex(b"hello");
        assert_eq!(
            hex,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let expected = format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE
                .encode(ring::digest::digest(&ring::digest::SHA256, b"hello"))
        );
        assert_eq!(digest_of_hex(&hex), Some(expected));
        assert_eq!(digest_of_hex("zz"), None);
    }
}
