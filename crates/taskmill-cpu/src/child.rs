//! Child mode: the re-executed binary serving jobs over stdin/stdout.
//!
//! Deliberately no tokio here: one job at a time on the main thread with plain
//! blocking IO, so a handler owns the whole process (and its rayon pool) and
//! the only concurrency is the one the handler asks for.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::frame::{self, Hello, PROTOCOL_VERSION, Response};
use crate::registry::{CpuRegistry, HandlerError, JobInput};

/// Environment variable that switches the binary into child mode (`"1"`).
pub const CHILD_ENV: &str = "TASKMILL_CPU_CHILD";
/// Environment variable with the child's rayon thread count (set by the pool).
pub const RAYON_THREADS_ENV: &str = "TASKMILL_CPU_RAYON_THREADS";
/// Environment variable with the maximum frame body size (set by the pool).
pub const MAX_FRAME_ENV: &str = "TASKMILL_CPU_MAX_FRAME_BYTES";
/// A built-in kind every child answers with `null` without touching the
/// registry; used to measure the bare hand-off round trip.
pub const NOOP_KIND: &str = "__taskmill.noop";

/// Exit status of a child after it reported a handler panic: its state may be
/// corrupt (poisoned locks, half-updated globals), so it is replaced.
pub const EXIT_AFTER_PANIC: i32 = 70;
/// Exit status of a child that received a malformed frame or could not write
/// to its parent: the stream is out of sync and cannot be recovered.
pub const EXIT_PROTOCOL_ERROR: i32 = 76;

/// Whether this process was started by a [`CpuPool`](crate::CpuPool) as a
/// worker process. Check it first thing in `main()`.
pub fn is_child_mode() -> bool {
    std::env::var_os(CHILD_ENV).is_some_and(|v| v == "1")
}

/// Serves jobs from the parent until it closes our stdin, then exits the
/// process (status 0 on a clean EOF).
///
/// Call it from `main()` when [`is_child_mode`] is true, before starting any
/// runtime or logger that writes to stdout: stdout carries the frames.
/// On entry, the real stdout is kept privately for frames and file
/// descriptor 1 is pointed at stderr, so a stray `println!` in a handler ends
/// up in the logs instead of corrupting the protocol; stdin is replaced by
/// `/dev/null` for the same reason.
pub fn run_child(registry: &CpuRegistry) -> ! {
    run_child_with(registry, || {})
}

/// [`run_child`], calling `on_exit` just before the process exits (no
/// destructor runs after `process::exit`): flush logs or span exporters there.
pub fn run_child_with(registry: &CpuRegistry, on_exit: impl FnOnce()) -> ! {
    let code = match child_main(registry) {
        Ok(code) => code,
        Err(err) => {
            eprintln!(
                "taskmill-cpu worker {}: cannot set up child mode: {err}",
                std::process::id()
            );
            EXIT_PROTOCOL_ERROR
        }
    };
    on_exit();
    std::process::exit(code)
}

fn child_main(registry: &CpuRegistry) -> io::Result<i32> {
    // Take private copies of the protocol pipes (close-on-exec, so
    // grandchildren a handler spawns never hold them open and hide our
    // death from the parent), then repoint fd 0/1 away from them.
    io::stdout().flush()?;
    let proto_in = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let proto_out = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    nix::unistd::dup2_stdout(io::stderr()).map_err(io::Error::from)?;
    let dev_null = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&dev_null).map_err(io::Error::from)?;

    let rayon_threads = std::env::var(RAYON_THREADS_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    if let Err(err) = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon_threads)
        .thread_name(|i| format!("taskmill-cpu-rayon-{i}"))
        .build_global()
    {
        // Only possible if something used rayon before run_child: keep going
        // with that pool rather than refusing to work.
        eprintln!("taskmill-cpu worker: global rayon pool already set up: {err}");
    }
    let max_frame = std::env::var(MAX_FRAME_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(frame::DEFAULT_MAX_FRAME_BYTES);

    let mut input = BufReader::with_capacity(64 * 1024, proto_in);
    let mut output = BufWriter::with_capacity(64 * 1024, proto_out);
    Ok(serve(registry, &mut input, &mut output, max_frame))
}

/// The request loop, generic over the streams so it can be unit-tested.
/// Returns the process exit status.
pub(crate) fn serve<R: io::Read, W: Write>(
    registry: &CpuRegistry,
    input: &mut R,
    output: &mut W,
    max_frame: usize,
) -> i32 {
    let hello = Response::Ready(Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        rayon_threads: rayon::current_num_threads(),
    });
    if send(output, &hello, max_frame).is_err() {
        return EXIT_PROTOCOL_ERROR;
    }
    loop {
        let body = match frame::read_frame(input, max_frame) {
            Ok(Some(body)) => body,
            Ok(None) => return 0,
            Err(err) => {
                eprintln!("taskmill-cpu worker: bad request frame: {err}");
                return EXIT_PROTOCOL_ERROR;
            }
        };
        let (header, payload) = match frame::decode_request(&body) {
            Ok(decoded) => decoded,
            Err(err) => {
                eprintln!("taskmill-cpu worker: bad request frame: {err}");
                return EXIT_PROTOCOL_ERROR;
            }
        };
        let job = JobInput {
            job_id: header.job_id,
            kind: header.kind,
            attempt: header.attempt,
            traceparent: header.traceparent,
            payload,
        };
        let outcome = if job.kind == NOOP_KIND {
            Ok(Ok(b"null".to_vec()))
        } else {
            catch_unwind(AssertUnwindSafe(|| registry.call(&job)))
        };
        let (response, panicked) = match outcome {
            Ok(Ok(result)) if result.len() >= max_frame => (
                Response::Error(HandlerError::Permanent {
                    message: format!(
                        "result of kind {} is {} bytes, above the frame limit of {max_frame}",
                        job.kind,
                        result.len()
                    ),
                }),
                false,
            ),
            Ok(Ok(result)) => (Response::Ok(result), false),
            Ok(Err(err)) => (Response::Error(err), false),
            Err(panic) => (Response::Panicked(panic_message(panic.as_ref())), true),
        };
        if let Err(err) = send(output, &response, max_frame) {
            eprintln!("taskmill-cpu worker: cannot write response: {err}");
            return EXIT_PROTOCOL_ERROR;
        }
        if panicked {
            return EXIT_AFTER_PANIC;
        }
    }
}

fn send<W: Write>(output: &mut W, response: &Response, max: usize) -> io::Result<()> {
    let bytes = frame::encode_response(response, max).map_err(io::Error::other)?;
    output.write_all(&bytes)?;
    output.flush()
}

/// Extracts the message of a panic payload (`&str` or `String`, as produced by
/// `panic!`), falling back to a fixed text for exotic payloads.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{RequestHeader, decode_response, encode_request, read_frame};
    use std::io::Cursor;

    fn request(kind: &str, payload: &[u8]) -> Vec<u8> {
        let header = RequestHeader {
            job_id: "j".into(),
            kind: kind.into(),
            attempt: 1,
            traceparent: None,
        };
        encode_request(&header, payload, 1 << 20).unwrap()
    }

    fn responses(out: &[u8]) -> Vec<Response> {
        let mut cursor = Cursor::new(out);
        let mut all = Vec::new();
        while let Some(body) = read_frame(&mut cursor, 1 << 20).unwrap() {
            all.push(decode_response(&body).unwrap());
        }
        all
    }

    fn registry() -> CpuRegistry {
        let mut reg = CpuRegistry::new();
        reg.register_fn("echo", |job| Ok(job.payload.to_vec()));
        reg.register_fn("boom", |_| panic!("kaboom {}", 7));
        reg
    }

    #[test]
    fn serves_until_eof_then_exits_zero() {
        let mut input = request("echo", b"\"hi\"");
        input.extend(request("missing", b"{}"));
        input.extend(request(NOOP_KIND, b""));
        let mut out = Vec::new();
        let code = serve(&registry(), &mut Cursor::new(input), &mut out, 1 << 20);
        assert_eq!(code, 0);
        let resp = responses(&out);
        assert!(matches!(resp[0], Response::Ready(ref h) if h.protocol == PROTOCOL_VERSION));
        assert_eq!(resp[1], Response::Ok(b"\"hi\"".to_vec()));
        assert!(
            matches!(&resp[2], Response::Error(HandlerError::Permanent { message }) if message.contains("unknown CPU job kind"))
        );
        assert_eq!(resp[3], Response::Ok(b"null".to_vec()));
        assert_eq!(resp.len(), 4);
    }

    #[test]
    fn panic_is_reported_and_stops_the_loop() {
        let mut input = request("boom", b"");
        input.extend(request("echo", b"1"));
        let mut out = Vec::new();
        let code = serve(&registry(), &mut Cursor::new(input), &mut out, 1 << 20);
        assert_eq!(code, EXIT_AFTER_PANIC);
        let resp = responses(&out);
        assert_eq!(resp.len(), 2);
        assert_eq!(resp[1], Response::Panicked("kaboom 7".into()));
    }

    #[test]
    fn garbage_input_is_a_protocol_error() {
        let mut out = Vec::new();
        let input = vec![3u8, 0, 0, 0, 1, 2, 3];
        let code = serve(&registry(), &mut Cursor::new(input), &mut out, 1 << 20);
        assert_eq!(code, EXIT_PROTOCOL_ERROR);
    }
}
