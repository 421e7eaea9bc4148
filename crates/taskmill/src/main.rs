//! The `taskmill` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    // A CPU worker process is this binary re-executed: serve jobs, then exit.
    taskmill_kinds::run_cpu_child_if_requested();
    taskmill::cli::main()
}
