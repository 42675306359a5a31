//! The public contract's types (`docs/contract.md`): what orchestrators, operators and
//! analysts see, shared by every layer above. The ground floor of the crate: it imports
//! nothing from the rest of it, so any module may use it and it can change only on purpose.
//!
//! - [`job`]: job kinds, the [`Envelope`] (who a job is, where its answers go), and the
//!   validated requests providers take (messages and roles, options, [`CacheMode`],
//!   [`FitMode`]). The wire JSON is decoded into these by `crate::job`.
//! - [`event`]: the `chunk` and `result` events, attempts, token counts.
//! - [`image`]: image jobs' requests and the stored pictures their results name.
//! - [`error_code`]: the `error.code` vocabulary.
//! - [`subject`]: literal subjects, the reply-subject rule, tenants as subject tokens,
//!   quoting job values in error texts.
//! - [`trace`]: the W3C `traceparent` a job may carry.

/// The NATS service API name every worker answers under (`$SRV.PING.llm-worker`, ...).
pub const SERVICE_NAME: &str = "llm-worker";

pub mod error_code;
pub mod event;
pub mod image;
pub mod job;
pub mod subject;
pub mod trace;

pub use error_code::ErrorCode;
pub use event::{
    AttemptRecord, CacheSaving, ErrorBody, ImagesMade, ResultEvent, Status, TokenClasses,
    TokensUsed, ToolCallChunk, Trimmed,
};
pub(crate) use event::{ChunkEvent, elapsed_ms};
pub use image::{IMAGES_BUCKET, ImageFormat, ImageObject, ImageRequest, image_object_name};
pub(crate) use job::{CONTEXT_HEADER, context_line};
pub use job::{
    CacheMode, CacheTtl, EmbedRequest, Envelope, FitMode, GenerateOptions, GenerateRequest, Image,
    ImageSource, JobKind, Message, Needs, ResponseFormat, Role, ServiceTier, Tool, ToolCall,
    ToolChoice,
};
pub(crate) use subject::{QUOTE_CHARS, is_literal_subject, quote};
pub use subject::{ReplyPolicy, subject_token};
pub use trace::w3c_trace_id;
