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
use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// How long, and for how many events, the rest of a finished answer's body is read so its
/// connection can be reused. A server that keeps sending after the end loses its connection.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const DRAIN_EVENTS: usize = 16;

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Event, SseError>> + Send>>;

/// Why the body of an SSE answer could not be read to its end.
#[derive(Debug)]
enum SseError {
    /// The connection or the framing broke.
    Broken(String),
    /// An event (or a line of it) is longer than this many bytes.
    TooLong(usize),
}

/// What the line-bounding layer yields besides bytes.
#[derive(Debug)]
enum BodyError {
    Transport(reqwest::Error),
    TooLong(usize),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Transport(e) => e.fmt(f),
            BodyError::TooLong(max) => write!(f, "an SSE event is longer than {max} bytes"),
        }
    }
}

/// What a decoder wants after one SSE event.
pub(crate) enum Step {
    /// Keep reading.
    More(Vec<ProviderEvent>),
    /// The answer (and its usage) is complete: stop reading the body.
    End(Vec<ProviderEvent>),
}

pub(crate) trait SseDecoder: Send + 'static {
    /// Decode one event; an `Err` ends the stream with that error.
    fn event(&mut self, event: &Event) -> Result<Step, ProviderError>;
    /// Whether the provider has signalled the end of the answer (a finish reason).
    fn finished(&self) -> bool;
}

/// Adapt a response body to an [`EventStream`] through `decoder`. An event longer than
/// `max_event` bytes fails the answer (`response_too_large`) before it is buffered whole.
pub fn decode<D: SseDecoder>(
    response: reqwest::Response,
    decoder: D,
    max_event: usize,
) -> EventStream {
    decode_body(super::body_stream(response), decoder, max_event)
}

/// [`decode`] over any body (the fuzz targets feed it arbitrary bytes).
pub(crate) fn decode_body<D: SseDecoder>(
    body: ByteStream,
    decoder: D,
    max_event: usize,
) -> EventStream {
    struct State<D> {
        events: Events,
        decoder: D,
        queue: VecDeque<ProviderEvent>,
        done: bool,
    }
    let events = bounded_lines(body, max_event)
        .eventsource()
        .map(|r| {
            r.map_err(|e| match e {
                eventsource_stream::EventStreamError::Transport(BodyError::TooLong(max)) => {
                    SseError::TooLong(max)
                }
                other => SseError::Broken(other.to_string()),
            })
        })
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
                Some(Err(SseError::TooLong(max))) => {
                    s.done = true;
                    let err = ProviderError::new(
                        ErrorCode::ResponseTooLarge,
                        format!("an SSE event is longer than {max} bytes (limits.max_line_bytes)"),
                    );
                    return Some((Err(err), s));
                }
                Some(Err(SseError::Broken(e))) => {
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

pub(crate) type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Hand the SSE parser complete lines only, with two repairs on the way: lines `error: X`
/// become `event: error` / `data: X` (buffering partial lines so a field split across network
/// chunks is still seen), and an event (the lines since the last blank one) longer than
/// `max_event` bytes ends the body with [`BodyError::TooLong`] instead of growing a buffer
/// without bound.
fn bounded_lines(
    body: ByteStream,
    max_event: usize,
) -> impl futures::Stream<Item = Result<bytes::Bytes, BodyError>> {
    struct State {
        body: ByteStream,
        /// The partial line after the last newline.
        carry: Vec<u8>,
        /// Bytes of the current event's complete lines.
        event_len: usize,
        done: bool,
    }
    let state = State {
        body,
        carry: Vec::new(),
        event_len: 0,
        done: false,
    };
    futures::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        match s.body.next().await {
            Some(Ok(chunk)) => {
                s.carry.extend_from_slice(&chunk);
                let cut = s
                    .carry
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let mut start = 0;
                for end in memchr::memchr_iter(b'\n', &s.carry[..cut]) {
                    let line = &s.carry[start..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    s.event_len = if line.is_empty() {
                        0
                    } else {
                        s.event_len + line.len() + 1
                    };
                    start = end + 1;
                }
                if s.event_len + (s.carry.len() - cut) > max_event {
                    s.done = true;
                    return Some((Err(BodyError::TooLong(max_event)), s));
                }
                let rest = s.carry.split_off(cut);
                let out = rewrite_lines(&s.carry);
                s.carry = rest;
                Some((Ok(out), s))
            }
            Some(Err(e)) => {
                s.done = true;
                Some((Err(BodyError::Transport(e)), s))
            }
            None if s.carry.is_empty() => None,
            None => {
                s.done = true;
                let out = rewrite_lines(&std::mem::take(&mut s.carry));
                Some((Ok(out), s))
            }
        }
    })
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
        let events: Vec<Event> = bounded_lines(body, 1024)
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

    async fn first_error(chunks: Vec<&'static [u8]>, max: usize) -> Option<String> {
        let chunks: Vec<reqwest::Result<bytes::Bytes>> = chunks
            .into_iter()
            .map(|c| Ok(bytes::Bytes::from_static(c)))
            .collect();
        let body: ByteStream = futures::stream::iter(chunks).boxed();
        let mut lines = Box::pin(bounded_lines(body, max));
        while let Some(item) = lines.next().await {
            if let Err(e) = item {
                return Some(e.to_string());
            }
        }
        None
    }

    #[tokio::test]
    async fn a_line_or_an_event_over_the_bound_ends_the_body_before_it_is_buffered() {
        // A line without a newline, arriving in pieces.
        let e = first_error(vec![b"data: aaaaaaaaaa", b"aaaaaaaaaa", b"aaaaaaaaaa"], 25).await;
        assert!(e.is_some_and(|e| e.contains("longer than 25 bytes")));
        // Many short lines without the blank line that ends an event.
        let e = first_error(vec![b"data: a\ndata: b\n", b"data: c\ndata: d\n"], 20).await;
        assert!(e.is_some());
        // Events under the bound, each ended by a blank line (also \r\n), pass.
        let ok = first_error(
            vec![b"data: aaaa\n\n", b"data: bbbb\r\n\r\ndata: cc", b"cc\n\n"],
            12,
        )
        .await;
        assert_eq!(ok, None);
    }
}
