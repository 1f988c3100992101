//! The LB host: interfaces, sysctls the data plane relies on, privileges, bpffs.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Errors about the host the agent runs on.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {0}: no such interface on this host")]
    NoInterface(String),
    #[error("interface {0}: has no IPv4 address to use as SNAT source (set vip.snat_address)")]
    NoIpv4(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lb-agent {what} needs root or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (it loads XDP programs, pins maps and changes sysctls); run it as root, e.g. via `cargo xtask run`")]
    Privileges { what: &'static str },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The interface's index, or an error naming it.
pub fn ifindex(name: &str) -> Result<u32, HostError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| HostError::NoInterface(name.to_string()))
}

/// The interface's first IPv4 address (its primary one).
pub fn primary_ipv4(name: &str) -> Result<Ipv4Addr, HostError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| HostError::Io {
        path: "getifaddrs".into(),
        source: e.into(),
    })?;
    for a in addrs {
        if a.interface_name != name {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Ok(sin.ip());
        }
    }
    Err(HostError::NoIpv4(name.to_string()))
}

/// Fails with a clear message unless the process can load XDP and pin maps.
pub fn check_privileges(what: &'static str) -> Result<(), HostError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    if has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        Ok(())
    } else {
        Err(HostError::Privileges { what })
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf when `pin_path` lies there and nothing is mounted yet.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), HostError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Ok(());
    }
    let st = nix::sys::statfs::statfs(root).map_err(|e| HostError::Io {
        path: root.into(),
        source: e.into(),
    })?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    log::info!("mounting bpffs at {}", root.display());
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| HostError::Io {
        path: root.into(),
        source: e.into(),
    })
}

/// Sysctls set for the data plane, restored to what they were when dropped.
#[derive(Default)]
pub struct Sysctls {
    saved: Vec<(PathBuf, String)>,
}

impl Sysctls {
    /// Sets `path` (under /proc/sys) to `value`, remembering the old value.
    pub fn set(&mut self, path: &str, value: &str) -> Result<(), HostError> {
        let p = Path::new("/proc/sys").join(path);
        let old = fs::read_to_string(&p).map_err(io(&p))?;
        let old = old.trim_end_matches('\n').to_string();
        if old == value {
            return Ok(());
        }
        fs::write(&p, value).map_err(io(&p))?;
        log::info!("sysctl {path}: {old:?} -> {value:?} (restored at exit)");
        self.saved.push((p, old));
        Ok(())
    }

    /// Sets what the XDP program needs on `interface`: forwarding (bpf_fib_lookup refuses
    /// without it, and the kernel forwards packets whose neighbour XDP could not resolve),
    /// accept_local (those packets carry a local address as source), no ICMP redirects.
    pub fn for_dataplane(&mut self, interface: &str) -> Result<(), HostError> {
        self.set(&format!("net/ipv4/conf/{interface}/forwarding"), "1")?;
        self.set(&format!("net/ipv4/conf/{interface}/accept_local"), "1")?;
        self.set(&format!("net/ipv4/conf/{interface}/send_redirects"), "0")?;
        self.set("net/ipv4/conf/all/send_redirects", "0")
    }

    /// Adds SNAT port ranges to ip_local_reserved_ports so the kernel never hands them out.
    pub fn reserve_ports(&mut self, ranges: &[(u16, u16)]) -> Result<(), HostError> {
        let path = "net/ipv4/ip_local_reserved_ports";
        let p = Path::new("/proc/sys").join(path);
        let old = fs::read_to_string(&p).map_err(io(&p))?;
        let mut parts: Vec<String> = old
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        // A crashed agent never restored the value: its ranges are already there.
        for (a, b) in ranges {
            let r = if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            };
            if !parts.contains(&r) {
                parts.push(r);
            }
        }
        self.set(path, &parts.join(","))
    }

    /// Restores every value changed, newest first.
    pub fn restore(&mut self) {
        while let Some((p, old)) = self.saved.pop() {
            if let Err(e) = fs::write(&p, &old) {
                log::warn!("restoring {}: {e}", p.display());
            }
        }
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        self.restore();
    }
}
