//! Server-sent events to [`ProviderEvent`]s: a protocol-neutral adapter.
//!
//! The SSE framing (blank-line events, `:` comments, `\r\n`, multi-line `data:`) is done by
//! `eventsource-stream`; each protocol supplies an [`SseDecoder`] that maps one event to
//! provider events and says when the answer has finished. The adapter turns "the body ended
//! before a finish signal" and transport errors into `truncated` errors, and stops reading
//! promptly when the decoder reports the end of the answer.

use std::collections::VecDeque;

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;

use super::{EventStream, ProviderEvent};
use crate::error::{ErrorCode, ProviderError};

/// What a decoder wants after one SSE event.
pub enum Step {
    /// Keep reading.
    More(Vec<ProviderEvent>),
    /// The answer (and its usage) is complete: stop reading the body.
    End(Vec<ProviderEvent>),
}

pub trait SseDecoder: Send + 'static {
    /// Decode one event; an `Err` ends the stream with that error.
    fn event(&mut self, event: &Event) -> Result<Step, ProviderError>;
    /// Whether the provider has signalled the end of the answer (a finish reason).
    fn finished(&self) -> bool;
}

/// Adapt a response body to an [`EventStream`] through `decoder`.
pub fn decode<D: SseDecoder>(response: reqwest::Response, decoder: D) -> EventStream {
    struct State<D> {
        events: std::pin::Pin<Box<dyn futures::Stream<Item = Result<Event, String>> + Send>>,
        decoder: D,
        queue: VecDeque<ProviderEvent>,
        done: bool,
    }
    let events = response
        .bytes_stream()
        .eventsource()
        .map(|r| r.map_err(|e| e.to_string()))
        .boxed();
    let state = State {
        events,
        decoder,
        queue: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.queue.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            match s.events.next().await {
                Some(Ok(event)) => match s.decoder.event(&event) {
                    Ok(Step::More(evs)) => s.queue.extend(evs),
                    Ok(Step::End(evs)) => {
                        s.queue.extend(evs);
                        s.done = true;
                    }
                    Err(e) => {
                        s.done = true;
                        return Some((Err(e), s));
                    }
                },
                Some(Err(e)) => {
                    s.done = true;
                    if s.decoder.finished() {
                        // The answer was complete; only the trailing usage/sentinel was lost.
                        continue;
                    }
                    let err = ProviderError::new(
                        ErrorCode::Truncated,
                        format!("stream broken before the answer finished: {e}"),
                    );
                    return Some((Err(err), s));
                }
                None => {
                    s.done = true;
                    if !s.decoder.finished() {
                        let err = ProviderError::new(
                            ErrorCode::Truncated,
                            "stream ended before the provider signalled the end of the answer",
                        );
                        return Some((Err(err), s));
                    }
                }
            }
        }
    })
    .boxed()
}
