//! One module per subcommand.

pub mod demo;
pub mod enqueue;
pub mod worker;
