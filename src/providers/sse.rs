//! Server-sent events to [`ProviderEvent`]s: a protocol-neutral adapter.
//!
//! The SSE framing (blank-line events, `:` comments, `\r\n`, multi-line `data:`) is done by
//! `eventsource-stream`; each protocol supplies an [`SseDecoder`] that maps one event to
//! provider events and says when the answer has finished. The adapter turns "the body ended
//! before a finish signal" and transport errors into `truncated` errors, and ends the event
//! stream as soon as the decoder reports the end of the answer.
//!
//! The rest of the body (`data: [DONE]`, the chunked terminator) is then still read, off the
//! answer's path: hyper returns a connection to the pool only once its response body has been
//! read to the end, and a dropped unfinished body closes it. Without the drain every streamed
//! answer cost a new TCP (and, against a real provider, TLS) connection.
//!
//! One deviation is repaired before parsing: older llama.cpp servers send errors as an SSE field
//! `error: {...}` instead of `data:`. A spec-compliant parser drops unknown fields, so the error
//! would vanish and look like a plain truncation; such lines are rewritten to
//! `event: error` + `data: {...}` first.

use std::collections::VecDeque;

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;

use super::{EventStream, ProviderEvent};
use crate::error::{ErrorCode, ProviderError};

/// How long, and for how many events, the rest of a finished answer's body is read so its
/// connection can be reused. A server that keeps sending after the end loses its connection.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const DRAIN_EVENTS: usize = 16;

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Event, String>> + Send>>;

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
        events: Events,
        decoder: D,
        queue: VecDeque<ProviderEvent>,
        done: bool,
    }
    let events = rewrite_error_fields(super::body_stream(response))
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
                        let rest =
                            std::mem::replace(&mut s.events, futures::stream::empty().boxed());
                        drain(rest);
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

/// Read what is left of a finished answer's body: inline while it is already buffered (the
/// usual case: `[DONE]` follows the last chunk), else in a background task, bounded by
/// [`DRAIN_TIME`] and [`DRAIN_EVENTS`].
fn drain(mut rest: Events) {
    use futures::FutureExt;
    let mut budget = DRAIN_EVENTS;
    while budget > 0 {
        match rest.next().now_or_never() {
            Some(Some(Ok(_))) => budget -= 1,
            // The body ended (the connection is back in the pool) or broke (it is closed).
            Some(_) => return,
            None => break,
        }
    }
    if budget == 0 {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let read_rest = async {
                for _ in 0..budget {
                    if !matches!(rest.next().await, Some(Ok(_))) {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, read_rest).await;
        });
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Rewrite lines `error: X` to `event: error` / `data: X`, buffering partial lines so a field
/// split across network chunks is still seen.
fn rewrite_error_fields(
    body: ByteStream,
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> {
    futures::stream::unfold(
        (body, Vec::<u8>::new(), false),
        |(mut body, mut carry, done)| async move {
            if done {
                return None;
            }
            match body.next().await {
                Some(Ok(chunk)) => {
                    carry.extend_from_slice(&chunk);
                    let cut = carry.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                    let rest = carry.split_off(cut);
                    let out = rewrite_lines(&carry);
                    Some((Ok(out), (body, rest, false)))
                }
                Some(Err(e)) => Some((Err(e), (body, carry, true))),
                None if carry.is_empty() => None,
                None => {
                    let out = rewrite_lines(&carry);
                    Some((Ok(out), (body, Vec::new(), true)))
                }
            }
        },
    )
}

fn rewrite_lines(text: &[u8]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(text.len() + 16);
    for line in text.split_inclusive(|b| *b == b'\n') {
        match line.strip_prefix(b"error:") {
            Some(rest) => {
                out.extend_from_slice(b"event: error\ndata:");
                out.extend_from_slice(rest);
            }
            None => out.extend_from_slice(line),
        }
    }
    bytes::Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn error_fields_become_error_events_even_when_split_across_chunks() {
        let chunks: Vec<reqwest::Result<bytes::Bytes>> = vec![
            Ok(bytes::Bytes::from_static(b"data: {\"a\":1}\n\ner")),
            Ok(bytes::Bytes::from_static(
                b"ror: {\"message\":\"ctx\"}\n\ndata: [DONE]\n\n",
            )),
        ];
        let body: ByteStream = futures::stream::iter(chunks).boxed();
        let events: Vec<Event> = rewrite_error_fields(body)
            .eventsource()
            .map(|e| e.unwrap())
            .collect()
            .await;
        let names: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e.event.as_str(), e.data.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("message", "{\"a\":1}"),
                ("error", "{\"message\":\"ctx\"}"),
                ("message", "[DONE]")
            ]
        );
    }
}
