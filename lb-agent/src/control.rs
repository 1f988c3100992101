//! The agent's control socket: one JSON request per connection, one JSON line back.
//! `lb-agent status` asks it what only the running agent knows.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot, watch},
};

/// What a client may ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The agent's own state and its backends' health.
    Status,
    /// Take a backend out of new connections, keeping its existing ones.
    Drain { vip: String, backend: String },
    /// Undo a drain.
    Undrain { vip: String, backend: String },
}

/// The running agent as it describes itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub interface: String,
    pub started_unix: u64,
}

/// The answer to a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<crate::backends::VipHealth>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<crate::vrrp::VrrpStatus>,
    /// What a command did, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Response {
    /// A failed answer.
    pub fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// Errors talking to the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: bad answer: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A request with the way back to its client; the agent's main loop answers it.
pub type Call = (Request, oneshot::Sender<Response>);

/// Serves requests until `shutdown` turns true, handing each to `calls`.
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let calls = calls.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = tokio::io::BufReader::new(r);
                    let read = tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await;
                    let resp = match read {
                        Ok(Ok(_)) => handle(&line, &calls).await,
                        _ => return,
                    };
                    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                    out.push(b'\n');
                    let _ = w.write_all(&out).await;
                });
            }
        }
    }
}

async fn handle(line: &str, calls: &mpsc::Sender<Call>) -> Response {
    let req = match serde_json::from_str::<Request>(line) {
        Ok(r) => r,
        Err(e) => return Response::error(format!("bad request: {e}")),
    };
    let (tx, rx) = oneshot::channel();
    if calls.send((req, tx)).await.is_err() {
        return Response::error("the agent is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the agent dropped the request"))
}

/// Sends one request and waits (briefly) for the answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ControlError::Decode {
        path: p.clone(),
        source,
    })
}
