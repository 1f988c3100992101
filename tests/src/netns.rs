//! Named network namespaces for tests: created with `ip netns add`, deleted on drop.

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// True when the test can run; under CI=true a missing privilege fails the test loudly.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (BPF, network namespaces) and CI=true: refusing to skip");
    }
    eprintln!("SKIP {test}: needs root (BPF, network namespaces)");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short id unique to this process and call: namespace and link names are built from it
/// so tests can run side by side.
pub fn unique_id() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = std::process::id() as u64 * 64 + (SEQ.fetch_add(1, Ordering::Relaxed) as u64 % 64);
    let mut s = Vec::new();
    while n > 0 {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    String::from_utf8(s).expect("ascii")
}

/// A named network namespace, deleted when dropped.
pub struct Netns {
    pub name: String,
    /// Deleted on drop; false for a second handle on a namespace another owns.
    owned: bool,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn new(name: &str) -> Self {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip netns add")
            .success();
        assert!(ok, "ip netns add {name}");
        let ns = Self {
            name: name.to_string(),
            owned: true,
        };
        ns.sh("ip link set lo up");
        ns
    }

    /// A handle on namespace `name`, which another handle owns (and deletes).
    pub fn borrowed(name: &str) -> Self {
        Self {
            name: name.to_string(),
            owned: false,
        }
    }

    /// Runs `cmd` with sh inside the namespace; panics with its output on failure.
    pub fn sh(&self, cmd: &str) -> String {
        let out = self.try_sh(cmd);
        match out {
            Ok(s) => s,
            Err(e) => panic!("in {}: `{cmd}` failed: {e}", self.name),
        }
    }

    /// Runs `cmd` with sh inside the namespace.
    pub fn try_sh(&self, cmd: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        self.sh(&format!("cat /sys/class/net/{dev}/ifindex"))
            .trim()
            .parse()
            .expect("ifindex")
    }

    /// The namespace's file, for setns and nsenter.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// The words that run a command (appended to them) inside the namespace:
    /// `ip netns exec NAME`, which also gives it its own mount of /sys.
    pub fn exec_words(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Like [`Netns::exec_words`] through nsenter: the network namespace only, the host's
    /// mounts kept (pins under /sys/fs/bpf, the cgroup tree).
    pub fn nsenter_words(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path().display())]
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> NsGuard {
        let back = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(self.path()).expect("netns file");
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into the test namespace");
        NsGuard { back }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Returns the thread to its namespace when dropped.
pub struct NsGuard {
    back: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = nix::sched::setns(self.back.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
    }
}

/// Names of namespaces that exist now.
pub fn list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    })
    .unwrap_or_default()
}
