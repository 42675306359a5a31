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
use crate::contract::{AttemptRecord, ErrorBody, ErrorCode, FitMode};
use crate::policy::{Cost, Ledger, Reserved};
use crate::pricing::PriceBook;

/// Prompt tokens counted for each message (roles, separators) on top of its bytes.
const PER_MESSAGE_TOKENS: usize = 16;
/// Tokens counted for each embedding input on top of its bytes (start and end markers).
const PER_INPUT_TOKENS: usize = 4;
/// Tokens an image may cost at most (Anthropic's largest images are about 1,600; OpenAI's
/// 1,105 in high detail; Gemini's 258).
const PER_IMAGE_TOKENS: usize = 1_600;
/// The most output tokens one generated picture is billed (gpt-image-1, high quality,
/// 1536x1024: 6,240; Gemini: 1,290).
const PER_PICTURE_TOKENS: u64 = 6_240;

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
            let usd = self.prices.attempt_cost(a).unwrap_or(0.0);
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Worst {
    /// Prompt tokens, at most.
    pub prompt: f64,
    /// Output tokens, at most (`max_tokens`).
    pub output: f64,
    /// USD per token of the prompt and of the output (0 without a price).
    pub input_price: f64,
    pub output_price: f64,
    /// USD of the call beyond its tokens: pictures at their per-image price.
    pub fixed_usd: f64,
}

impl Worst {
    pub(crate) fn of(target: &Target, call: Call<'_>, prices: &PriceBook) -> Worst {
        let (prompt, output) = match call {
            Call::Generate(req) => {
                let images: usize = req.messages.iter().map(|m| m.images.len()).sum();
                let prompt = crate::context::prompt_bytes(req)
                    + PER_MESSAGE_TOKENS * (req.messages.len() + 1)
                    + PER_IMAGE_TOKENS * images;
                (prompt, req.options.max_tokens.map_or(0, u64::from))
            }
            Call::Embed(inputs) => (inputs.iter().map(|i| i.len() + PER_INPUT_TOKENS).sum(), 0),
            Call::Image(req) => (req.prompt.len(), PER_PICTURE_TOKENS * u64::from(req.n)),
        };
        let price = prices.price_now(&target.provider.name, &target.model);
        // Pictures billed per picture cost that at most, whatever their tokens.
        let fixed_usd = match (call, &price) {
            (Call::Image(req), Some(p)) => {
                let each = p
                    .image_price(req.size.as_deref(), req.quality.as_deref())
                    .or_else(|| p.per_image.values().copied().reduce(f64::max))
                    .unwrap_or(0.0);
                each * f64::from(req.n)
            }
            _ => 0.0,
        };
        let (input_price, output_price) = price.map_or((0.0, 0.0), |p| {
            let input = [
                p.cache_write_per_mtok,
                p.cache_write_1h_per_mtok,
                p.image_input_per_mtok,
            ]
            .into_iter()
            .flatten()
            .fold(p.input_per_mtok, f64::max);
            let out = p.reasoning_per_mtok.unwrap_or(0.0).max(p.output_per_mtok);
            (input / 1_000_000.0, out / 1_000_000.0)
        });
        Worst {
            prompt: prompt as f64,
            output: output as f64,
            input_price,
            output_price,
            fixed_usd,
        }
    }

    pub(crate) fn cost(&self) -> Cost {
        Cost {
            usd: self.prompt * self.input_price + self.output * self.output_price + self.fixed_usd,
            tokens: self.prompt + self.output,
        }
    }

    /// The most output that fits in `room` once `spent` and the prompt are paid for (`None`
    /// when not even [`crate::context::MIN_OUTPUT`] does).
    pub(crate) fn output_within(&self, room: Cost, spent: Cost) -> Option<u32> {
        let left = room.minus(spent).minus(Cost {
            usd: self.fixed_usd,
            tokens: 0.0,
        });
        let by_tokens = left.tokens - self.prompt;
        let by_usd = if self.output_price > 0.0 {
            (left.usd - self.prompt * self.input_price) / self.output_price
        } else if left.usd + 1e-12 >= self.prompt * self.input_price {
            f64::INFINITY
        } else {
            -1.0
        };
        let most = by_tokens.min(by_usd).min(self.output).floor();
        (most >= f64::from(crate::context::MIN_OUTPUT)).then_some(most as u32)
    }
}

impl CallGate for BudgetGate<'_> {
    async fn before_call(
        &self,
        target: &Target,
        call: Call<'_>,
        attempts: &[AttemptRecord],
    ) -> Result<Option<u32>, ErrorBody> {
        let spent = self.spent(attempts);
        let mut worst = Worst::of(target, call, self.prices);
        let mut lowered = None;
        let mut pause = Duration::from_millis(20);
        loop {
            let need = spent.plus(worst.cost());
            let held = self.reserved().unwrap_or_default();
            if held.covers(need) {
                return Ok(lowered);
            }
            let extra = need.minus(held).floor();
            match self
                .ledger
                .reserve_budget(self.tenant, self.policy, extra, held)
                .await
            {
                Reserved::Yes => {
                    *self.reserved.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(held.plus(extra));
                    return Ok(lowered);
                }
                Reserved::No { why, room } => {
                    // A generation call may ask for less output (as context fitting lowers
                    // max_tokens), unless the job said `fit: strict`.
                    let trim = matches!(call, Call::Generate(r) if r.options.fit == FitMode::Trim);
                    match worst.output_within(room, spent).filter(|_| trim) {
                        Some(output) if f64::from(output) < worst.output => {
                            worst.output = f64::from(output);
                            lowered = Some(output);
                        }
                        _ => return Err(exceeded(why)),
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_that_fits_is_bounded_by_tokens_usd_and_what_was_asked() {
        let w = Worst {
            prompt: 30.0,
            output: 4096.0,
            input_price: 1e-6,
            output_price: 4e-6,
            fixed_usd: 0.0,
        };
        let room = |usd: f64, tokens: f64| Cost { usd, tokens };
        // Tokens: 1000 − 10 spent − 30 prompt.
        assert_eq!(
            w.output_within(room(f64::INFINITY, 1000.0), room(0.0, 10.0)),
            Some(960)
        );
        // USD: (0.001 − 30e-6) / 4e-6 = 242.5.
        assert_eq!(
            w.output_within(room(0.001, f64::INFINITY), Cost::default()),
            Some(242)
        );
        // Never more than asked; nothing below the least output.
        assert_eq!(
            w.output_within(room(f64::INFINITY, 1e9), Cost::default()),
            Some(4096)
        );
        assert_eq!(
            w.output_within(room(f64::INFINITY, 45.0), Cost::default()),
            None
        );
        // No output price: USD bounds only the prompt.
        let free = Worst {
            output_price: 0.0,
            ..w
        };
        assert_eq!(
            free.output_within(room(1.0, 100.0), Cost::default()),
            Some(70)
        );
        assert_eq!(free.output_within(room(1e-6, 100.0), Cost::default()), None);
    }
}
