//! [`Worker`]: one running child process, and the request/response exchange
//! over its pipes.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::frame::{self, FrameError, Response};

/// A running worker process.
pub(super) struct Worker {
    pub(super) slot: usize,
    pub(super) pid: u32,
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) stdout: BufReader<ChildStdout>,
    pub(super) jobs_done: u64,
}

pub(super) enum ExchangeError {
    /// Writing the request failed: the child was gone before it got the job.
    Write(io::Error),
    /// The child's stdout ended (it died or closed it).
    Eof,
    Read(io::Error),
    Frame(FrameError),
}

fn read_error(err: io::Error) -> ExchangeError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ExchangeError::Eof
    } else {
        ExchangeError::Read(err)
    }
}

pub(super) async fn read_response(
    stdout: &mut BufReader<ChildStdout>,
    max: usize,
) -> Result<Response, ExchangeError> {
    let mut prefix = [0u8; 4];
    stdout.read_exact(&mut prefix).await.map_err(read_error)?;
    let len = frame::parse_len(prefix, max).map_err(ExchangeError::Frame)?;
    let mut body = vec![0u8; len];
    stdout.read_exact(&mut body).await.map_err(read_error)?;
    frame::decode_response(&body).map_err(ExchangeError::Frame)
}

pub(super) async fn exchange(
    w: &mut Worker,
    prefix: &[u8],
    payload: &[u8],
    max: usize,
) -> Result<Response, ExchangeError> {
    let stdin = w
        .stdin
        .as_mut()
        .ok_or_else(|| ExchangeError::Write(io::ErrorKind::BrokenPipe.into()))?;
    stdin
        .write_all(prefix)
        .await
        .map_err(ExchangeError::Write)?;
    if !payload.is_empty() {
        stdin
            .write_all(payload)
            .await
            .map_err(ExchangeError::Write)?;
    }
    stdin.flush().await.map_err(ExchangeError::Write)?;
    read_response(&mut w.stdout, max).await
}
