//! The worker's side of the batch lane (`crate::batch`, `docs/batch.md`): handing a job that
//! can wait to the lane, and answering a job the lane held from its line of a provider batch.
//! Either way the job ends as every job does: its result stored once in the results stream
//! (never replacing one stored first), then sent to its reply subject.

use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};

use super::{Answer, Disposal, JobMessage, Outbox, Routing, Worker, ack, requeue, spend_of};
use crate::contract::{JobKind, ServiceTier};
use crate::job::{Job, JobBody};

impl<O: Outbox> Worker<O> {
    /// Hand `job` to the batch lane when it asks for `batch`, this worker has the lane, and
    /// the first provider of its route takes batches: acked once the lane holds it (requeued
    /// if it could not be handed over). `None`: the job runs online here.
    pub(super) async fn hand_over(
        &self,
        msg: &impl JobMessage,
        routing: &Routing,
        job: &Job,
        delivered: i64,
    ) -> Option<Disposal> {
        let intake = self.lane.as_ref()?;
        let JobBody::Generate(req) = &job.body else {
            return None;
        };
        if req.service_tier != ServiceTier::Batch || msg.held() {
            return None;
        }
        let target = routing.chain.plan(job).into_iter().next()?;
        if !target.provider.batches() {
            return None;
        }
        let handover = crate::lane::Handover {
            job_id: job.envelope.job_id,
            tenant: &job.envelope.tenant,
            subject: msg.subject(),
            payload: msg.payload().clone(),
            published: msg.published(),
            traceparent: msg.traceparent(),
            provider: &target.provider.name,
            model: &target.model,
            deadline: job.expires_at,
        };
        Some(match intake.hand_over(handover).await {
            Ok(()) => {
                tracing::info!(provider = %target.provider.name, model = %target.model, "handed to the batch lane");
                ack(msg, AckKind::Ack).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand the job to the batch lane; requeueing");
                ack(msg, requeue(delivered)).await
            }
        })
    }

    /// Answer the held job `msg` with `body`, its line's response from `provider`'s batch for
    /// `model` created at `created`. `Err(why)`: the line is no answer to it (the lane then
    /// sends the job online). A job answered before is left as it is (`Ok`).
    pub(crate) async fn answer_batched(
        &self,
        msg: &impl JobMessage,
        (provider, model): (&str, &str),
        body: &str,
        created: DateTime<Utc>,
    ) -> Result<Disposal, String> {
        let routing = self.routing();
        let job = self
            .decode(JobKind::Generate, msg, &routing)
            .map_err(|invalid| invalid.reason)?;
        let JobBody::Generate(req) = &job.body else {
            return Err("not a generation job".into());
        };
        match self.outbox.stored(job.envelope.job_id).await {
            Ok(Some(_)) => return Ok(Disposal::Acked),
            Ok(None) => {}
            Err(e) => return Err(format!("cannot check for a stored result: {e}")),
        }
        let Some(target) = routing.chain.registry().get(provider) else {
            return Err(format!("provider {provider} is no longer configured"));
        };
        let (record, outcome) = routing.chain.batched(target, model, req, body, created);
        let success = outcome.map_err(|e| e.message)?;
        let received_at = msg.published().unwrap_or(created);
        let mut result = self.result_of(&job, vec![record], Ok(Answer::Text(success)), received_at);
        result.service_tier = ServiceTier::Batch;
        let tenant = &job.envelope.tenant;
        if let (Some(policy), Some(ledger)) = (routing.limits.policy(tenant), &self.ledger) {
            let (usd, tokens) = spend_of(&result.attempts);
            ledger.charge(tenant, policy, usd, tokens, None).await;
        }
        Ok(self
            .finish(msg, job.kind, &job.envelope, &result, AckKind::Ack)
            .await)
    }
}
