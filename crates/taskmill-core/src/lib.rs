//! Core types of taskmill. This crate does no IO: it is the shared vocabulary of
//! every other crate and the one place where the wire protocol's rules live.
//!
//! Layout:
//! - [`celery`]: Celery protocol v2: decoding Celery task messages into an
//!   envelope, and the result messages of Celery's `rpc://` backend.
//! - [`wire`]: protocol v1: header names, the [`wire::Envelope`] a producer
//!   publishes and its decoding with reasons for everything a worker must refuse.
//! - [`error`]: [`error::JobError`], the handler error whose variant decides what
//!   the runtime does (retry, dead-letter), and [`error::Outcome`], the bounded
//!   set of outcomes used in metrics and logs.
//! - [`config`]: the worker configuration: TOML file < `TASKMILL_*` env < flags.
//! - [`redact`]: hiding credentials in URLs before they reach logs or output.
//! - [`retry`]: the retry policy and its backoff schedule.
//!
//! ```
//! use taskmill_core::wire::Envelope;
//! let env = Envelope::new("io.sleep", "default", br#"{"ms": 10}"#.to_vec());
//! assert_eq!(env.attempt, 1);
//! ```

pub mod celery;
pub mod config;
pub mod error;
pub mod redact;
pub mod retry;
pub mod wire;

pub use error::{JobError, Outcome};
pub use wire::{DeadReason, DecodeError, Envelope, HeaderValue};
