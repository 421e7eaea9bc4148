//! The `taskmill` command: `worker`, `enqueue`, `config`, `demo`, `dlq`,
//! `bench`, and the built-in job kinds. Logic that other programs could reuse lives in the
//! library crates; this crate wires them.
//!
//! Layout:
//! - [`cli`]: argument parsing and config loading (file < env < flags).
//! - [`kinds`]: the built-in kinds (`noop`, `io.sleep`, `io.http_get`,
//!   `cpu.hash`, `cpu.primes`) and the diagnostic kinds, from `taskmill-kinds`.
//! - [`commands`]: one module per subcommand; `bench` only turns its flags
//!   into `taskmill_bench::Options`.
//! - [`help`]: the clap command with each flag's variable and default;
//!   also the source of the completions and the man page.
//! - [`report`]: a failure as one line with its remedy, and the exit status.

pub mod cli;
pub mod commands;
pub mod help;
pub mod report;
pub use taskmill_kinds as kinds;
