use super::*;
use crate::contract::{GenerateOptions, Message};

/// `n` words of one token each (o200k: "hello" then " hello" ...).
fn words(n: usize) -> String {
    vec!["hello"; n].join(" ")
}

fn msg(role: Role, n: usize) -> Message {
    Message::text(role, words(n))
}

fn window(tokens: u32) -> Window {
    Window {
        tokens,
        counter: Counter::for_model("gpt-4o"),
        default_reserve: None,
    }
}

/// System prompt of 10 tokens, chunks of 100 tokens each, `messages`, `max_tokens`.
fn request(chunks: usize, messages: Vec<Message>, max_tokens: Option<u32>) -> GenerateRequest {
    GenerateRequest {
        system: Some(words(10)),
        context: (0..chunks).map(|_| words(100)).collect(),
        messages,
        options: GenerateOptions {
            max_tokens,
            ..Default::default()
        },
        stream: true,
        ..Default::default()
    }
}

fn trimmed(fit: Fit) -> (GenerateRequest, Trimmed) {
    match fit {
        Fit::Trimmed(req, t) => (*req, t),
        other => panic!("expected a trimmed request, got {other:?}"),
    }
}

#[test]
fn a_request_that_fits_is_sent_as_it_is() {
    let req = request(3, vec![msg(Role::User, 20)], Some(100));
    assert_eq!(fit(&req, window(128_000)), Fit::AsIs);
    let exact = crate::tokens::prompt_tokens(&Counter::for_model("gpt-4o"), &req);
    // Counted (the byte bound is too coarse) and fits to the token.
    assert_eq!(fit(&req, window(exact as u32 + 100)), Fit::AsIs);
}

#[test]
fn piecewise_counts_match_the_whole_prompt() {
    let req = request(3, vec![msg(Role::User, 20), msg(Role::Assistant, 5)], None);
    let counter = Counter::for_model("gpt-4o");
    let whole = crate::tokens::prompt_tokens(&counter, &req);
    let pieces = Counts::of(&req, &counter).total(3, 0);
    assert!(pieces.abs_diff(whole) <= 2, "{pieces} vs {whole}");
}

#[test]
fn the_least_relevant_context_chunks_go_first() {
    // ~10 system + 3 x ~103 chunks + ~23 message: ~350 tokens; 200 of room for 250 leaves 1 chunk.
    let req = request(3, vec![msg(Role::User, 20)], Some(50));
    let (sent, t) = trimmed(fit(&req, window(250)));
    assert_eq!(
        sent.context,
        req.context[..1].to_vec(),
        "the first chunk stays"
    );
    assert_eq!(sent.messages, req.messages);
    assert_eq!((t.chunks_dropped, t.messages_dropped), (2, 0));
    assert!(t.tokens_after + 50 <= 250 && t.tokens_before > 250, "{t:?}");
    assert_eq!(
        sent.options.max_tokens,
        Some(50),
        "not lowered: chunks made room"
    );
    assert_eq!(t.max_tokens_after, None);
}

#[test]
fn then_the_oldest_messages_keeping_the_system_prompt_and_the_last_user_message() {
    let conversation = vec![
        msg(Role::User, 60),
        msg(Role::Assistant, 60),
        msg(Role::User, 60),
        msg(Role::Assistant, 60),
        msg(Role::User, 30),
    ];
    let req = request(2, conversation.clone(), Some(20));
    // Room for the system prompt, the last exchange and the last question, not the first one.
    let (sent, t) = trimmed(fit(&req, window(230)));
    assert!(
        sent.context.is_empty(),
        "every chunk goes before any message"
    );
    assert_eq!(sent.messages, conversation[2..].to_vec());
    assert_eq!(sent.system, req.system);
    assert_eq!((t.chunks_dropped, t.messages_dropped), (2, 2));
    // Room for the last answer and question: the conversation must not start with the answer.
    let (sent, t) = trimmed(fit(&req, window(140)));
    assert_eq!(sent.messages, conversation[4..].to_vec());
    assert_eq!(t.messages_dropped, 4);
}

#[test]
fn max_tokens_is_lowered_to_the_room_left_only_when_the_job_allows_it() {
    let req = request(0, vec![msg(Role::User, 100)], Some(500));
    let (sent, t) = trimmed(fit(&req, window(400)));
    let room = 400 - t.tokens_after as u32;
    assert_eq!(sent.options.max_tokens, Some(room));
    assert_eq!(
        (t.max_tokens_before, t.max_tokens_after),
        (Some(500), Some(room))
    );
    assert_eq!(t.tokens_before, t.tokens_after);
    let mut strict = req.clone();
    strict.options.fit = FitMode::Strict;
    assert!(matches!(fit(&strict, window(400)), Fit::TooLong(_)));
    // Never below MIN_OUTPUT tokens of room.
    let tight = window(t.tokens_after as u32 + MIN_OUTPUT - 1);
    assert!(matches!(fit(&req, tight), Fit::TooLong(_)));
}

#[test]
fn the_providers_default_output_is_reserved_when_the_job_sets_none() {
    let req = request(1, vec![msg(Role::User, 20)], None);
    let mut w = window(300);
    assert_eq!(fit(&req, w), Fit::AsIs);
    w.default_reserve = Some(4096);
    // Lowered from the default; the provider then gets an explicit max_tokens.
    let (sent, t) = trimmed(fit(&req, w));
    assert_eq!(t.max_tokens_before, Some(4096));
    assert_eq!(sent.options.max_tokens, t.max_tokens_after);
    assert_eq!(t.chunks_dropped, 1);
}

#[test]
fn a_last_message_larger_than_the_window_is_too_long_with_its_counts() {
    let req = request(2, vec![msg(Role::User, 50), msg(Role::User, 500)], Some(10));
    let Fit::TooLong(t) = fit(&req, window(300)) else {
        panic!("must not fit")
    };
    assert_eq!((t.reserve, t.window), (10, 300));
    assert!(
        t.prompt_tokens > 700 && t.least_tokens >= 500 && t.least_tokens < 530,
        "{t:?}"
    );
    assert!(t.describe().contains("the window is 300"));
}
