//! A cgroup (v2) of a lab's, for socket-mode VIPs: the agent attaches its connect4 and
//! getpeername4 hooks there, and a command started through [`Cgroup::enter`] runs inside.
//! The bench also counts the CPU of its processes by their cgroup.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A cgroup under the root of the cgroup v2 tree, removed when dropped, together with any
/// process still in it.
pub struct Cgroup(PathBuf);

impl Cgroup {
    /// Creates `name` under the root of the cgroup v2 tree: `lb-<lab id>-...`, so that
    /// [`crate::lab::Footprint`] finds it if it outlives its lab, or `PARENT/CHILD` below
    /// one created before (and dropped after).
    pub fn create(name: &str) -> std::io::Result<Self> {
        let p = lb_agent::host::root_cgroup().join(name);
        fs::create_dir(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The words that run a command (appended to them) inside this cgroup: a shell moves
    /// itself in, then execs the command.
    pub fn enter(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.0.display()),
            "sh".into(),
        ]
    }

    /// Moves process `pid` (all its threads) in.
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        fs::write(self.0.join("cgroup.procs"), pid.to_string())
    }

    /// The CPU time of every process in it and below it, since it was created (cpu.stat's
    /// usage_usec: user and system time, kept without the cpu controller).
    pub fn usage_usec(&self) -> u64 {
        fs::read_to_string(self.0.join("cpu.stat"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Whether a process is in it or below it.
    fn populated(&self) -> bool {
        fs::read_to_string(self.0.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A process left behind (a test's or a bench's that failed half-way) would keep
        // the cgroup: kill what is in it and wait for it to go.
        if self.populated() {
            let _ = fs::write(self.0.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.populated() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir(&self.0);
    }
}
