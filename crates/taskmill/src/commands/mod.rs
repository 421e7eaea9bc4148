//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod dlq;
pub mod enqueue;
pub mod worker;
