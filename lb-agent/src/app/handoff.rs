//! `lb-agent restart`: the running agent hands its data plane, its VRRP mastership and its
//! host changes to the `lb-agent` binary now on disk by re-executing itself in place (the
//! same PID: the service manager sees no restart), and the new agent takes them over.
//!
//! The maps and the pinned link carry the data plane and every backend's state (a start
//! adopts them, as after a crash); the hand-off file carries only what the maps do not:
//! whether this host was VRRP master (the successor then resumes as master at once, before
//! the peer's Master_Down_Interval and the addresses' lifetime run out), the sysctls'
//! original values, and the apiservers discovery found.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{config::Config, discovery::Found};

/// A hand-off older than this is a leftover, not ours.
const MAX_AGE: Duration = Duration::from_secs(60);

/// What the next agent needs that the maps do not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The process that wrote it: the successor runs in the same one.
    pub pid: u32,
    /// Names this restart: `lb-agent restart` waits for an agent that reports it.
    pub token: String,
    pub written_unix_ms: u64,
    /// This host was VRRP master: the successor resumes as master at once.
    pub vrrp_master: bool,
    /// Sysctls to restore when the agent finally stops (`host::Sysctls`).
    pub sysctls: Vec<(PathBuf, String)>,
    /// The apiservers discovery found, by VIP: the successor serves them at once rather
    /// than the seed until it has listed them again.
    #[serde(default)]
    pub discovered: BTreeMap<String, Found>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where the hand-off of the agent with control socket `socket` is written.
pub fn file(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".handoff");
    PathBuf::from(p)
}

impl Handoff {
    /// A hand-off from this process.
    pub fn new(token: String, vrrp_master: bool, sysctls: Vec<(PathBuf, String)>) -> Self {
        Self {
            pid: std::process::id(),
            token,
            written_unix_ms: now_ms(),
            vrrp_master,
            sysctls,
            discovered: BTreeMap::new(),
        }
    }

    /// With what discovery found.
    pub fn with_discovered(mut self, discovered: BTreeMap<String, Found>) -> Self {
        self.discovered = discovered;
        self
    }

    /// Writes it for the agent with control socket `socket` (0600: it is root's business).
    pub fn write(&self, socket: &Path) -> std::io::Result<()> {
        let path = file(socket);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Takes (reads and removes) the hand-off meant for this process, if there is one:
    /// written by this PID, recently. Anything else there is a leftover and is removed.
    pub fn take(socket: &Path) -> Option<Self> {
        let path = file(socket);
        let bytes = std::fs::read(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        let h: Handoff = match serde_json::from_slice(&bytes) {
            Ok(h) => h,
            Err(e) => {
                log::warn!("{}: ignored, unreadable: {e}", path.display());
                return None;
            }
        };
        let age = Duration::from_millis(now_ms().saturating_sub(h.written_unix_ms));
        if h.pid != std::process::id() || age > MAX_AGE {
            log::warn!(
                "{}: ignored, a leftover (written by pid {} {}s ago)",
                path.display(),
                h.pid,
                age.as_secs()
            );
            return None;
        }
        Some(h)
    }
}

/// The `lb-agent` binary now on disk where this process's came from: `/proc/self/exe`
/// names it, with " (deleted)" once an upgrade replaced the file.
pub fn binary_on_disk() -> std::io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

/// What `lb-agent version --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub map_layout_version: u32,
}

impl Version {
    /// This binary's.
    pub fn ours() -> Self {
        Self {
            version: crate::VERSION.to_string(),
            map_layout_version: lb_common::MAP_LAYOUT_VERSION,
        }
    }

    /// What the binary at `exe` says of itself.
    pub fn of(exe: &Path) -> Result<Self, String> {
        let out = Command::new(exe)
            .args(["version", "--json"])
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} version --json: {}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{} version --json: {e} (a binary older than `lb-agent restart`?)",
                exe.display()
            )
        })
    }
}

/// How a restart into a binary goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Way {
    /// The successor adopts everything: nothing is lost, nothing moves.
    Keep,
    /// The data plane cannot be kept (why): this agent stops as on SIGTERM (resigning the
    /// VIP to the peer, removing the data plane) and the successor starts afresh.
    Afresh(String),
}

/// Whether the successor (`next`, with config `new`) can adopt what this agent (with
/// config `old`) leaves: the same map layout, interface, pin directory and flow table.
pub fn way(next: &Version, old: &Config, new: &Config) -> Way {
    let why = if next.map_layout_version != lb_common::MAP_LAYOUT_VERSION {
        Some(format!(
            "the new binary's map layout is {}, the running data plane's {}",
            next.map_layout_version,
            lb_common::MAP_LAYOUT_VERSION
        ))
    } else if old.agent.interface != new.agent.interface {
        Some(format!(
            "agent.interface changes ({} -> {})",
            old.agent.interface.as_deref().unwrap_or("none"),
            new.agent.interface.as_deref().unwrap_or("none")
        ))
    } else if old.agent.pin_path != new.agent.pin_path {
        Some(format!(
            "agent.pin_path changes ({} -> {})",
            old.agent.pin_path.display(),
            new.agent.pin_path.display()
        ))
    } else if old.agent.max_flows != new.agent.max_flows {
        Some(format!(
            "agent.max_flows changes ({} -> {}): the flow table is resized",
            old.agent.max_flows, new.agent.max_flows
        ))
    } else if old.agent.control_socket != new.agent.control_socket {
        Some("agent.control_socket changes: the successor would not find the hand-off".into())
    } else {
        None
    };
    why.map_or(Way::Keep, Way::Afresh)
}

/// Replaces this process with `exe run --config config`; returns only if that failed.
pub fn exec(exe: &Path, config: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    // A format given on the command line stays: the service's log shipper expects it.
    if let Some(f) = crate::logging::format_from_cli() {
        cmd.arg("--log-format").arg(f.as_str());
    }
    cmd.arg("run").arg("--config").arg(config).exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "[agent]\ninterface = \"eth0\"\n\n\
        [[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n\
        [[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n";

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("lb.toml"), text).unwrap()
    }

    #[test]
    fn a_restart_keeps_everything_unless_the_layout_or_the_data_plane_changes() {
        let old = cfg(CFG);
        let same = Version::ours();
        assert_eq!(way(&same, &old, &old), Way::Keep);
        let newer = Version {
            map_layout_version: lb_common::MAP_LAYOUT_VERSION + 1,
            ..Version::ours()
        };
        assert!(matches!(way(&newer, &old, &old), Way::Afresh(w) if w.contains("map layout")));
        let bigger = cfg(&CFG.replace(
            "interface = \"eth0\"\n",
            "interface = \"eth0\"\nmax_flows = 100000\n",
        ));
        assert!(
            matches!(way(&same, &old, &bigger), Way::Afresh(w) if w.contains("agent.max_flows"))
        );
        // Backends may change: the successor applies them as a reload would.
        let more = cfg(&format!(
            "{CFG}[[vip.backend]]\nname = \"m2\"\naddress = \"198.18.0.12\"\n"
        ));
        assert_eq!(way(&same, &old, &more), Way::Keep);
    }

    #[test]
    fn only_this_process_takes_a_recent_hand_off() {
        let dir = std::env::temp_dir().join(format!("lb-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("lb.sock");
        let found = Found {
            vip: "api".into(),
            backends: ["198.18.0.13:6443".parse().unwrap()].into(),
            resource_version: "7".into(),
            via: "198.18.0.11:6443".into(),
            at_unix: 1,
        };
        let h = Handoff::new("t1".into(), true, vec![("/proc/sys/x".into(), "0".into())])
            .with_discovered([("api".to_string(), found)].into());
        h.write(&sock).unwrap();
        assert_eq!(Handoff::take(&sock), Some(h.clone()));
        assert_eq!(Handoff::take(&sock), None, "taken once");
        let other = Handoff {
            pid: h.pid + 1,
            ..h.clone()
        };
        other.write(&sock).unwrap();
        assert_eq!(Handoff::take(&sock), None, "another process's");
        assert!(!file(&sock).exists(), "a leftover is removed");
        let old = Handoff {
            written_unix_ms: h.written_unix_ms - 120_000,
            ..h
        };
        old.write(&sock).unwrap();
        assert_eq!(Handoff::take(&sock), None, "too old");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
