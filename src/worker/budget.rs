//! A job's budget gate: before each provider call (generation, or a batch of embedding
//! inputs), the tenant's budgets are reserved for what the job has spent so far plus the
//! call's worst case ([`crate::policy::budget`] says why
//! that keeps spend within the budget); the job's charge settles the reservation. A call
//! whose reservation cannot fit while other jobs of the tenant hold budget waits for them
//! (until the job's deadline); one that cannot fit at all ends the job `budget_exceeded`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chain::{Call, CallGate, Target};
use crate::config::TenantPolicy;
use crate::contract::{AttemptRecord, ErrorBody, ErrorCode};
use crate::policy::{Cost, Ledger, Reserved};
use crate::pricing::PriceBook;

/// Prompt tokens counted for each message (roles, separators) on top of its bytes.
const PER_MESSAGE_TOKENS: usize = 16;
/// Tokens counted for each embedding input on top of its bytes (start and end markers).
const PER_INPUT_TOKENS: usize = 4;
/// Tokens an image may cost at most (Anthropic's largest images are about 1,600; OpenAI's
/// 1,105 in high detail; Gemini's 258).
const PER_IMAGE_TOKENS: usize = 1_600;

pub(crate) struct BudgetGate<'a> {
    ledger: &'a Ledger,
    tenant: &'a str,
    policy: &'a TenantPolicy,
    prices: &'a PriceBook,
    deadline: Instant,
    cancel: &'a CancellationToken,
    reserved: Mutex<Option<Cost>>,
}

impl<'a> BudgetGate<'a> {
    pub(crate) fn new(
        ledger: &'a Ledger,
        tenant: &'a str,
        policy: &'a TenantPolicy,
        prices: &'a PriceBook,
        deadline: Instant,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            ledger,
            tenant,
            policy,
            prices,
            deadline,
            cancel,
            reserved: Mutex::new(None),
        }
    }

    /// What the job reserved, if it reserved anything (its charge settles it).
    pub(crate) fn reserved(&self) -> Option<Cost> {
        *self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the job's calls so far cost (priced now, as the worker prices its results).
    fn spent(&self, attempts: &[AttemptRecord]) -> Cost {
        attempts.iter().fold(Cost::default(), |c, a| {
            let usd = self
                .prices
                .cost(
                    &a.provider,
                    &a.model,
                    a.started_at,
                    a.input_tokens,
                    a.output_tokens,
                    &a.classes,
                )
                .unwrap_or(0.0);
            c.plus(Cost {
                usd,
                tokens: (a.input_tokens + a.output_tokens) as f64,
            })
        })
    }
}

/// The most a call to `target` can cost: its prompt's bound (bytes, plus
/// [`PER_MESSAGE_TOKENS`] a message and [`PER_IMAGE_TOKENS`] an image; an embedding input's
/// bytes plus [`PER_INPUT_TOKENS`]) at the highest input-side price of the model, and
/// `max_tokens` at the highest output-side one. No USD without a price (a USD budget then
/// cannot bound the call).
pub(crate) fn worst_case(target: &Target, call: Call<'_>, prices: &PriceBook) -> Cost {
    let (prompt, output) = match call {
        Call::Generate(req) => {
            let images: usize = req.messages.iter().map(|m| m.images.len()).sum();
            let prompt = crate::context::prompt_bytes(req)
                + PER_MESSAGE_TOKENS * (req.messages.len() + 1)
                + PER_IMAGE_TOKENS * images;
            (prompt, req.options.max_tokens.map_or(0, u64::from))
        }
        Call::Embed(inputs) => (inputs.iter().map(|i| i.len() + PER_INPUT_TOKENS).sum(), 0),
    };
    let (prompt, output) = (prompt as f64, output as f64);
    let usd = prices
        .price_now(&target.provider.name, &target.model)
        .map_or(0.0, |p| {
            let input = [
                p.cache_write_per_mtok,
                p.cache_write_1h_per_mtok,
                p.image_input_per_mtok,
            ]
            .into_iter()
            .flatten()
            .fold(p.input_per_mtok, f64::max);
            let out = p.reasoning_per_mtok.unwrap_or(0.0).max(p.output_per_mtok);
            (prompt * input + output * out) / 1_000_000.0
        });
    Cost {
        usd,
        tokens: prompt + output,
    }
}

impl CallGate for BudgetGate<'_> {
    async fn before_call(
        &self,
        target: &Target,
        call: Call<'_>,
        attempts: &[AttemptRecord],
    ) -> Result<(), ErrorBody> {
        let need = self
            .spent(attempts)
            .plus(worst_case(target, call, self.prices));
        let held = self.reserved().unwrap_or_default();
        let extra = need.minus(held).floor();
        if held.covers(need) {
            return Ok(());
        }
        let mut pause = Duration::from_millis(20);
        loop {
            match self
                .ledger
                .reserve_budget(self.tenant, self.policy, extra, held)
                .await
            {
                Reserved::Yes => {
                    *self.reserved.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(held.plus(extra));
                    return Ok(());
                }
                Reserved::No(why) => return Err(exceeded(why)),
                Reserved::Wait(why) => {
                    // Jobs in flight hold the room: wait for them, within the deadline.
                    if Instant::now() + pause >= self.deadline {
                        return Err(exceeded(why));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.cancel.cancelled() => {
                            return Err(ErrorBody {
                                code: ErrorCode::Cancelled,
                                message: "cancelled while waiting for the tenant's budget".into(),
                                retryable: false,
                            });
                        }
                    }
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

fn exceeded(why: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::BudgetExceeded,
        message: format!("budget_exceeded: {why}"),
        retryable: false,
    }
}
