//! The agent's control socket: one JSON request per connection, one JSON line back.
//! `lb-agent status` asks it what only the running agent knows.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{watch, Mutex},
};

/// What a client may ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The agent's own state.
    Status,
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

/// Shared state the server answers from.
pub type Shared = Arc<Mutex<AgentInfo>>;

/// Serves requests until `shutdown` turns true.
pub async fn serve(listener: UnixListener, state: Shared, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = tokio::io::BufReader::new(r);
                    let read = tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await;
                    let resp = match read {
                        Ok(Ok(_)) => handle(&line, &state).await,
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

async fn handle(line: &str, state: &Shared) -> Response {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) => Response {
            ok: true,
            agent: Some(state.lock().await.clone()),
            ..Default::default()
        },
        Err(e) => Response {
            ok: false,
            error: Some(format!("bad request: {e}")),
            ..Default::default()
        },
    }
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
