//! A provider that answers from a script, in memory and on tokio's clock (unit tests only):
//! the chain's timing rules are tested with it under a paused clock, without a network.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::{Call, FinishReason, ProviderEvent, Usage};
use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// One call's behaviour.
pub(crate) enum Play {
    /// Text pieces, each after its pause, then the finish and usage (1 token per piece).
    Answer(Vec<(Duration, &'static str)>),
    /// The call fails before any byte of an answer.
    Fail(ProviderError),
    /// Text pieces, each after its pause, then silence with the stream open.
    Stall(Vec<(Duration, &'static str)>),
    /// The response never starts.
    Hang,
}

/// A script of plays, one per call, in order; calls beyond it fail with a server error.
pub(crate) struct Scripted {
    plays: Mutex<VecDeque<Play>>,
    calls: Mutex<Vec<Instant>>,
}

impl Scripted {
    pub(crate) fn new(plays: impl IntoIterator<Item = Play>) -> Arc<Self> {
        Arc::new(Self {
            plays: Mutex::new(plays.into_iter().collect()),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// When each call started.
    pub(crate) fn calls(&self) -> Vec<Instant> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub(crate) async fn generate(&self) -> Result<Call, ProviderError> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(Instant::now());
        }
        let play = self.plays.lock().ok().and_then(|mut p| p.pop_front());
        let (pieces, finish) = match play {
            None => {
                return Err(ProviderError::new(
                    ErrorCode::ServerError,
                    "script exhausted",
                ));
            }
            Some(Play::Fail(e)) => return Err(e),
            Some(Play::Hang) => std::future::pending().await,
            Some(Play::Answer(pieces)) => (pieces, true),
            Some(Play::Stall(pieces)) => (pieces, false),
        };
        let n = pieces.len() as u64;
        let text = futures::stream::iter(pieces).then(|(pause, piece)| async move {
            tokio::time::sleep(pause).await;
            Ok(ProviderEvent::Delta(piece.to_string()))
        });
        let end = futures::stream::iter(finish.then_some([
            Ok(ProviderEvent::Finish(FinishReason::Stop)),
            Ok(ProviderEvent::Usage(Usage::plain(1, n))),
        ]))
        .flat_map(futures::stream::iter);
        let silence = futures::stream::iter((!finish).then(futures::stream::pending)).flatten();
        Ok(Call {
            http_status: Some(200),
            events: text.chain(end).chain(silence).boxed(),
        })
    }
}
