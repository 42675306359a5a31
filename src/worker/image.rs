//! An image job: the image chain, then its pictures into the object store before the result
//! is stored (`crate::image_store`). A redelivered job whose pictures an earlier run put is
//! answered from them, without a provider call.

use chrono::{DateTime, Utc};

use super::{Answer, Outbox, Routing, Worker};
use crate::contract::{
    ErrorBody, ErrorCode, ImageObject, ImageRequest, ResultEvent, image_object_name,
};
use crate::image_store::sha256_hex;
use crate::job::Job;
use crate::providers::pictures::describe;

/// Why an image job's pictures could not be kept: the job goes back to the queue.
pub(super) struct NotKept(pub String);

impl<O: Outbox> Worker<O> {
    pub(super) async fn image(
        &self,
        routing: &Routing,
        job: &Job,
        req: &ImageRequest,
        received_at: DateTime<Utc>,
        delivered: i64,
        bounds: super::generate::Bounds<'_>,
    ) -> Result<ResultEvent, NotKept> {
        let (Some(chain), Some(store)) = (&routing.image, &self.images) else {
            let error = ErrorBody {
                code: ErrorCode::AllProvidersFailed,
                message: "image jobs are not configured on this worker".into(),
                retryable: false,
            };
            return Ok(self.result_of(job, Vec::new(), Err(error), received_at));
        };
        let env = &job.envelope;
        if delivered > 1 {
            match store.earlier_result(&env.job_id, &env.tenant).await {
                Ok(Some(result)) => {
                    tracing::info!(
                        "the pictures of an earlier run are stored; answering from them"
                    );
                    return Ok(result);
                }
                Ok(None) => {}
                Err(e) => return Err(NotKept(e)),
            }
        }
        let outcome = chain.images(job, req, bounds.chain()).await;
        let mut success = match outcome.result {
            Ok(s) => s,
            Err(e) => return Ok(self.result_of(job, outcome.attempts, Err(e), received_at)),
        };
        // The bytes go to the store, not into the result.
        let pictures = std::mem::take(&mut success.pictures);
        let objects: Vec<ImageObject> = pictures
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                // Every picture was checked to be one (`providers::pictures::check`).
                let d = describe(&p.bytes)?;
                Some(ImageObject {
                    object: image_object_name(&env.job_id, i, d.extension),
                    bucket: store.bucket().to_string(),
                    bytes: p.bytes.len() as u64,
                    sha256: sha256_hex(&p.bytes),
                    media_type: d.media_type.to_string(),
                    width: d.width,
                    height: d.height,
                    revised_prompt: p.revised_prompt.clone(),
                })
            })
            .collect();
        let result = self.result_of(
            job,
            outcome.attempts,
            Ok(Answer::Pictures(success, objects.clone())),
            received_at,
        );
        let copy = serde_json::to_string(&result).map_err(|e| NotKept(e.to_string()))?;
        for (picture, object) in pictures.iter().zip(&objects) {
            store
                .put(&object.object, &picture.bytes, &copy)
                .await
                .map_err(NotKept)?;
        }
        tracing::debug!(pictures = objects.len(), "pictures stored");
        Ok(result)
    }
}
