//! The agent's control socket: one JSON request per connection, one JSON line back.
//! `lb-agent status` asks it what only the running agent knows; `drain`/`undrain` change
//! state through it.
//!
//! The socket is created 0600 (root only), or 0660 with `agent.control_socket_group`, and
//! never with whatever mode the umask gives: it is bound under a temporary name, its mode
//! and group set, then renamed into place. Requests that change state are also checked
//! against the peer's credentials (SO_PEERCRED), so a socket made reachable by mistake (a
//! chmod, a bind mount into a container) still only reports.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
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
    /// Configure a fault-injection point (agents built with the `failpoints` feature only).
    Failpoint { name: String, actions: String },
    /// Re-read the config file (`config`, or the one the agent runs with) and apply what
    /// changed; the answer's message has one line per change.
    Reload {
        #[serde(default)]
        config: Option<String>,
    },
    /// Replace the agent with the `lb-agent` binary now on disk, keeping the data plane,
    /// its flows and the VRRP mastership; the answer's `token` names the restart.
    Restart {
        #[serde(default)]
        config: Option<String>,
    },
    /// Change the log level (a level or a tracing filter) until the next restart.
    LogLevel { level: String },
}

impl Request {
    /// True for requests the agent's main loop answers (they replace its config or
    /// itself); the keeper answers the others.
    pub fn for_agent(&self) -> bool {
        matches!(self, Request::Reload { .. } | Request::Restart { .. })
    }

    /// True for requests that change what the agent does.
    pub fn changes_state(&self) -> bool {
        !matches!(self, Request::Status)
    }
}

/// Who sent a request, from SO_PEERCRED and SO_PEERGROUPS (both taken by the kernel when
/// the peer connected, so a later exec or pid reuse changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// True when the peer could read `path` itself (by the file's mode bits): the agent
    /// reads a config file a peer names only then, so a reload cannot be used to read
    /// (and echo in an error) a file the peer may not see.
    pub fn may_read(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.uid == 0 {
            return true;
        }
        let Ok(m) = std::fs::metadata(path) else {
            return false;
        };
        let mode = m.mode();
        if m.uid() == self.uid {
            return mode & 0o400 != 0;
        }
        if m.gid() == self.gid || self.groups.contains(&m.gid()) {
            return mode & 0o040 != 0;
        }
        mode & 0o004 != 0
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = nix::unistd::User::from_uid(self.uid.into())
            .ok()
            .flatten()
            .map(|u| format!(" ({})", u.name))
            .unwrap_or_default();
        write!(f, "uid {}{name}", self.uid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        Ok(())
    }
}

/// Who may change state: root, the agent's own user, members of the configured group.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub agent_uid: u32,
    pub group: Option<u32>,
}

impl Access {
    /// Whether `peer` may send requests that change state.
    pub fn may_change(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.agent_uid {
            return true;
        }
        let Some(g) = self.group else { return false };
        peer.gid == g || peer.groups.contains(&g)
    }
}

/// The peer's supplementary groups (SO_PEERGROUPS), empty when the kernel does not say.
fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    let mut buf = [0u32; 256];
    let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
    // SAFETY: buf and len are valid for the call; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Vec::new();
    }
    buf[..len as usize / 4].to_vec()
}

/// Requests longer than this are refused: a peer must not make the agent buffer without end.
const MAX_REQUEST: u64 = 64 * 1024;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;

/// The running agent as it describes itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The config file, as an absolute path.
    pub config: String,
    /// SHA-256 of the config file's bytes as loaded, hex; empty from an agent too old to say.
    #[serde(default)]
    pub config_sha256: String,
    /// When the config file was loaded, Unix seconds; 0 from an agent too old to say.
    #[serde(default)]
    pub config_loaded_unix: u64,
    pub interface: String,
    pub started_unix: u64,
    /// Map entries the reconcile found wrong and repaired, since start.
    #[serde(default)]
    pub map_repairs: u64,
    /// The last repair, in words.
    #[serde(default)]
    pub last_map_repair: Option<String>,
    /// Map writes that failed (and were retried), since start.
    #[serde(default)]
    pub map_write_failures: u64,
    /// Some map write has not succeeded yet: the data plane is behind the agent.
    #[serde(default)]
    pub maps_behind: bool,
    /// The `lb-agent restart` this agent continues (its token), if it was started by one.
    #[serde(default)]
    pub restarted_by: Option<String>,
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
    /// Where each VIP that follows the `kubernetes` EndpointSlice has its backends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Vec<crate::discovery::DiscoveryStatus>>,
    /// What a command did, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Names a restart under way (`Request::Restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
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

    /// A successful answer that says what was done.
    pub fn done(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            ..Default::default()
        }
    }
}

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: permission denied (it is {mode}; run as root{group})")]
    Denied {
        path: String,
        mode: String,
        group: String,
    },
    #[error("control socket {path}: bad answer: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("agent.control_socket_group: no group {0:?} on this host")]
    NoGroup(String),
}

/// A request with its sender and the way back to its client; the agent answers it.
pub type Call = (Request, Peer, oneshot::Sender<Response>);

/// Binds the control socket at `path`: 0600, or 0660 owned by `group`.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // Born 0600 (not umask-wide and then narrowed): nobody can connect in between.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(&tmp);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io)?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| match group {
            Some(g) => nix::unistd::chown(&tmp, None, Some(g.into())).map_err(Into::into),
            None => Ok(()),
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(listener)
}

/// Where requests go: the agent's main loop, or the keeper (`Request::for_agent`).
#[derive(Clone)]
pub struct Routes {
    pub agent: mpsc::Sender<Call>,
    pub keeper: mpsc::Sender<Call>,
}

/// Serves requests until `shutdown` turns true: state-changing requests from peers that
/// `access` refuses are answered with an error; everything else goes where `routes` says.
pub async fn serve(
    listener: UnixListener,
    calls: Routes,
    access: Access,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and the like persist: don't spin on them.
                        log::warn!("control socket: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    log::warn!("control socket: {MAX_CONNECTIONS} connections open, refusing more");
                    continue;
                };
                let peer = match stream.peer_cred() {
                    Ok(c) => Peer {
                        uid: c.uid(),
                        gid: c.gid(),
                        pid: c.pid(),
                        groups: peer_groups(std::os::fd::AsRawFd::as_raw_fd(&stream)),
                    },
                    Err(e) => {
                        log::warn!("control socket: reading the peer's credentials: {e}");
                        continue;
                    }
                };
                let calls = calls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
                    let read = tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await;
                    let resp = match read {
                        Ok(Ok(_)) => handle(&line, peer, access, &calls).await,
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

async fn handle(line: &str, peer: Peer, access: Access, routes: &Routes) -> Response {
    let req = match serde_json::from_str::<Request>(line) {
        Ok(r) => r,
        Err(e) => return Response::error(format!("bad request: {e}")),
    };
    if req.changes_state() && !access.may_change(&peer) {
        log::warn!(
            "control socket: refused {req:?} from {peer}: not root, the agent's user or its group"
        );
        return Response::error(format!(
            "permission denied: {peer} may read status but not change state (root, the agent's user{} only)",
            if access.group.is_some() { " or agent.control_socket_group" } else { "" }
        ));
    }
    if let Request::Failpoint { name, actions } = &req {
        return failpoint(name, actions, &peer);
    }
    // Process-wide, no task owns it: answered here.
    if let Request::LogLevel { level } = &req {
        return match crate::logging::set_level(level) {
            Ok(m) => {
                log::info!("{m} (asked by {peer})");
                Response::done(m)
            }
            Err(e) => Response::error(e),
        };
    }
    let (tx, rx) = oneshot::channel();
    let to = if req.for_agent() {
        &routes.agent
    } else {
        &routes.keeper
    };
    if to.send((req, peer, tx)).await.is_err() {
        return Response::error("the agent is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the agent dropped the request"))
}

#[cfg(feature = "failpoints")]
fn failpoint(name: &str, actions: &str, peer: &Peer) -> Response {
    match fail::cfg(name, actions) {
        Ok(()) => {
            log::warn!("failpoint {name} set to {actions:?} by {peer}");
            Response::done(format!("failpoint {name}: {actions}"))
        }
        Err(e) => Response::error(format!("failpoint {name}: {e}")),
    }
}

#[cfg(not(feature = "failpoints"))]
fn failpoint(name: &str, _actions: &str, _peer: &Peer) -> Response {
    Response::error(format!(
        "failpoint {name}: this lb-agent was built without the failpoints feature"
    ))
}

/// Sends one request and waits (briefly) for the answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(denied(path));
        }
        Err(e) => return Err(io(e)),
    };
    // A reload checks the file against the host and rewrites maps: give it longer.
    let wait = match req {
        Request::Reload { .. } => Duration::from_secs(15),
        _ => Duration::from_secs(2),
    };
    s.set_read_timeout(Some(wait)).map_err(io)?;
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

fn denied(path: &Path) -> ControlError {
    use std::os::unix::fs::MetadataExt;
    let (mode, group) = match std::fs::metadata(path) {
        Ok(m) => {
            let gname = nix::unistd::Group::from_gid(m.gid().into())
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_else(|| m.gid().to_string());
            (
                format!("{:04o}, group {gname}", m.mode() & 0o7777),
                if m.mode() & 0o020 != 0 {
                    format!(" or as a member of group {gname}")
                } else {
                    ", or set agent.control_socket_group".to_string()
                },
            )
        }
        Err(_) => ("unreadable".into(), String::new()),
    };
    ControlError::Denied {
        path: path.display().to_string(),
        mode,
        group,
    }
}

/// The gid of group `name`.
pub fn group_id(name: &str) -> Result<u32, ControlError> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| ControlError::NoGroup(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_names_only_files_it_could_read_itself() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lb-may-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("lb.toml");
        std::fs::write(&f, "x").unwrap();
        let owner = nix::unistd::geteuid().as_raw();
        let stranger = Peer {
            uid: owner.wrapping_add(4242),
            gid: 4242,
            pid: None,
            groups: vec![],
        };
        let root = Peer {
            uid: 0,
            ..stranger.clone()
        };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!stranger.may_read(&f));
        assert!(root.may_read(&f));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(stranger.may_read(&f));
        assert!(!stranger.may_read(&dir.join("missing.toml")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn who_may_change_state() {
        let a = Access {
            agent_uid: 0,
            group: None,
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
            groups: Vec::new(),
        };
        assert!(a.may_change(&peer(0, 0)));
        assert!(!a.may_change(&peer(1000, 1000)));
        let g = Access {
            agent_uid: 0,
            group: Some(4242),
        };
        assert!(g.may_change(&peer(1000, 4242)), "primary group");
        assert!(!g.may_change(&peer(1000, 1000)));
        let member = Peer {
            uid: 1000,
            gid: 1000,
            pid: None,
            groups: vec![27, 4242],
        };
        assert!(g.may_change(&member), "supplementary group");
        assert!(!Request::Status.changes_state());
        assert!(Request::Drain {
            vip: "a".into(),
            backend: "b".into()
        }
        .changes_state());
    }

    #[tokio::test]
    async fn the_socket_is_0600_whatever_the_umask() {
        let dir = std::env::temp_dir().join(format!("lb-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let l = bind(&path, None);
        nix::sys::stat::umask(old);
        let _l = l.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
