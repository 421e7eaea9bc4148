//! The `taskmill` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    taskmill::cli::main()
}
