//! The LB host: interfaces, sysctls the data plane relies on, privileges, bpffs.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Errors about the host the agent runs on.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {0}: no such interface on this host")]
    NoInterface(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lb-agent {what} lacks {missing}; run it as root, or grant exactly {all} (systemd: AmbientCapabilities={all})")]
    Privileges {
        what: &'static str,
        missing: String,
        all: String,
    },
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

/// A Linux capability the agent may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Chown = 0,
    NetAdmin = 12,
    NetRaw = 13,
    SysAdmin = 21,
    SysNice = 23,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    fn name(self) -> &'static str {
        match self {
            Cap::Chown => "CAP_CHOWN",
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::NetRaw => "CAP_NET_RAW",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysNice => "CAP_SYS_NICE",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capability set of this process.
pub fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// What `lb-agent run` needs the kernel to let it do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// VRRP is configured: raw sockets and gratuitous ARPs.
    pub vrrp: bool,
    /// A DSR VIP is configured: the VIP-path probes' packet sockets.
    pub dsr: bool,
    /// vrrp.rt_priority is set: SCHED_RR.
    pub realtime: bool,
    /// agent.control_socket_group is set: the socket and pins are given to the group.
    pub group: bool,
}

/// The capabilities `needs` requires that `caps` lacks, each with why it is needed.
pub fn missing_caps(caps: u64, needs: Needs) -> Vec<(&'static str, &'static str)> {
    let has = |c: Cap| caps & (1u64 << c as u32) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN stands in for both on kernels before 5.8 and for root.
    if !has(Cap::SysAdmin) {
        if !has(Cap::Bpf) {
            missing.push((Cap::Bpf.name(), "loading the XDP program and its maps"));
        }
        // The verifier refuses the data plane's packet bounds checks (an offset added to
        // a packet pointer) as "pointer arithmetic prohibited for !root" without it.
        if !has(Cap::Perfmon) {
            missing.push((
                Cap::Perfmon.name(),
                "the verifier accepts the XDP program's pointer arithmetic only with it",
            ));
        }
    }
    if !has(Cap::NetAdmin) {
        missing.push((
            Cap::NetAdmin.name(),
            "attaching XDP, the VIP addresses, sysctls",
        ));
    }
    if needs.vrrp && !has(Cap::NetRaw) {
        missing.push((Cap::NetRaw.name(), "VRRP's raw socket and gratuitous ARPs"));
    } else if needs.dsr && !has(Cap::NetRaw) {
        missing.push((
            Cap::NetRaw.name(),
            "the DSR backends' VIP-path probes (packet sockets)",
        ));
    }
    if needs.realtime && !has(Cap::SysNice) {
        missing.push((Cap::SysNice.name(), "vrrp.rt_priority (SCHED_RR)"));
    }
    if needs.group && !has(Cap::Chown) {
        missing.push((
            Cap::Chown.name(),
            "giving the control socket and the pins to agent.control_socket_group",
        ));
    }
    missing
}

/// Fails naming every missing capability unless the process may do what `needs` says.
pub fn check_privileges(what: &'static str, needs: Needs) -> Result<(), HostError> {
    let missing = missing_caps(effective_caps(), needs);
    if missing.is_empty() {
        return Ok(());
    }
    Err(HostError::Privileges {
        what,
        missing: missing
            .iter()
            .map(|(c, why)| format!("{c} ({why})"))
            .collect::<Vec<_>>()
            .join(", "),
        all: {
            let mut all = vec![Cap::Bpf.name(), Cap::Perfmon.name(), Cap::NetAdmin.name()];
            if needs.vrrp {
                all.push(Cap::NetRaw.name());
            }
            if needs.realtime {
                all.push(Cap::SysNice.name());
            }
            if needs.group {
                all.push(Cap::Chown.name());
            }
            all.join(" ")
        },
    })
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
        source: if e == nix::errno::Errno::EPERM {
            std::io::Error::other(
                "bpffs is not mounted and mounting it needs CAP_SYS_ADMIN (or mount it first: mount -t bpf bpf /sys/fs/bpf)",
            )
        } else {
            e.into()
        },
    })
}

/// Sysctls set for the data plane, restored to what they were when dropped.
#[derive(Default)]
pub struct Sysctls {
    saved: Vec<(PathBuf, String)>,
}

impl Sysctls {
    /// Sysctls an earlier agent of this process changed (`hand_over`): restored, oldest
    /// value last, when this one stops.
    pub fn inherit(saved: Vec<(PathBuf, String)>) -> Self {
        Self { saved }
    }

    /// The values to restore, for the next agent (`lb-agent restart`); nothing is
    /// restored here.
    pub fn hand_over(mut self) -> Vec<(PathBuf, String)> {
        std::mem::take(&mut self.saved)
    }

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

/// Loads config `path` and checks it against this host: everything `check-config` does,
/// for `run`, `reload` and `restart` alike.
pub async fn load_checked(
    path: &Path,
) -> Result<crate::config::Config, crate::config::ConfigError> {
    let cfg = crate::config::Config::load(path)?;
    check_config(&cfg).await?;
    Ok(cfg)
}

/// Checks `cfg` against this host as `check-config` does, beyond what parsing checks: the
/// interfaces, the SNAT ranges against the kernel's ephemeral range, the probes' TLS files,
/// the control group, generic mode's hazards and the address owner's addresses. The error
/// is the same one line `check-config` prints.
pub async fn check_config(cfg: &crate::config::Config) -> Result<(), crate::config::ConfigError> {
    use crate::{config, control, dataplane::generic, netlink::Netlink, vrrp};
    match config::read_ephemeral_range() {
        Ok(range) => cfg.check_port_ranges(range)?,
        Err(e) => log::warn!("cannot read net.ipv4.ip_local_port_range: {e}"),
    }
    let error = |field: String, message: String| config::ConfigError {
        file: cfg.path.clone(),
        field,
        message,
    };
    for (i, v) in cfg.vips.iter().enumerate() {
        if let Err(e) = crate::health::tls_config(&v.health) {
            return Err(error(
                format!("vip[{i}].health.{}", e.field),
                format!(
                    "{}{}",
                    e.message,
                    if e.field == "ca_file" {
                        " (the CA that signed the apiservers' certificates; or set insecure_skip_verify = true)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    for (i, v) in cfg.vips.iter().enumerate() {
        let Some(d) = &v.discovery else { continue };
        let field = format!("vip[{i}].discovery.kubeconfig");
        if !d.kubeconfig.exists() {
            // A node that has not joined yet: discovery waits for the file.
            log::warn!(
                "{}: {field}: {} does not exist (yet); the configured backends serve until it does",
                cfg.path.display(),
                d.kubeconfig.display()
            );
            continue;
        }
        let creds = crate::discovery::kubeconfig::load(&d.kubeconfig)
            .map_err(|e| error(field.clone(), format!("{}: {e}", d.kubeconfig.display())))?;
        // Discovery verifies the apiservers as the probes do, whatever their kind.
        crate::health::client_config(&v.health, creds.identity).map_err(|e| match e.field {
            "ca_file" => error(
                format!("vip[{i}].health.ca_file"),
                format!("{} (discovery verifies the apiservers with it)", e.message),
            ),
            _ => error(
                field.clone(),
                format!("{}: {}", d.kubeconfig.display(), e.message),
            ),
        })?;
    }
    let index = match &cfg.agent.interface {
        None => None,
        Some(iface) => Some(ifindex(iface).map_err(|_| {
            error(
                "agent.interface".into(),
                format!("no interface {iface:?} on this host"),
            )
        })?),
    };
    if cfg.vips.iter().any(|v| v.mode == config::Mode::Socket) {
        let cg = cfg.agent.cgroup.clone().unwrap_or_else(root_cgroup);
        // Every cgroup v2 directory has cgroup.controllers; a v1 one does not.
        if !cg.join("cgroup.controllers").exists() {
            return Err(error(
                "agent.cgroup".into(),
                format!(
                    "{} is not a cgroup v2 directory on this host (the socket-mode hooks attach there)",
                    cg.display()
                ),
            ));
        }
    }
    let local = local_ipv4();
    if let Some((field, message)) = dsr_backend_on_this_host(cfg, &local) {
        return Err(error(field, message));
    }
    for w in colocated_warnings(cfg, &local) {
        log::warn!("{w}");
    }
    if let (config::XdpModeSetting::Generic, Some(index), Some(iface)) =
        (cfg.agent.xdp_mode, index, &cfg.agent.interface)
    {
        // Refused by `run` too; check-config sees the same interface, so it says so first.
        let hazard = async {
            let nl = Netlink::connect()?;
            let links = nl.links().await.map_err(|e| e.source)?;
            Ok::<_, std::io::Error>(generic::generic_hazard(&links, index))
        };
        match hazard.await {
            Ok(None) => {}
            Ok(Some(h)) => return Err(error("agent.xdp_mode".into(), generic::refusal(iface, &h))),
            Err(e) => log::warn!("cannot list the links of this host: {e}"),
        }
    }
    if let Some(g) = &cfg.agent.control_socket_group {
        if control::group_id(g).is_err() {
            return Err(error(
                "agent.control_socket_group".into(),
                format!("no group {g:?} on this host"),
            ));
        }
    }
    if let Some(v) = &cfg.vrrp {
        let Ok(index) = ifindex(&v.interface) else {
            return Err(error(
                "vrrp.interface".into(),
                format!("no interface {:?} on this host", v.interface),
            ));
        };
        if v.priority == vrrp::state::PRIORITY_OWNER {
            // 255 means "these addresses are mine": a second master would follow otherwise.
            let unowned = async {
                let nl = Netlink::connect()?;
                vrrp::unowned_address(v, index, &nl)
                    .await
                    .map_err(|e| e.source)
            };
            match unowned.await {
                Ok(None) => {}
                Ok(Some((a, p))) => {
                    return Err(error(
                        "vrrp.priority".into(),
                        format!(
                            "255 is for the owner of the virtual addresses, but {a}/{p} is not an address of {} (use 1-254, or configure the address on the interface)",
                            v.interface
                        ),
                    ))
                }
                Err(e) => log::warn!("cannot list the addresses of {}: {e}", v.interface),
            }
        }
    }
    Ok(())
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, Linux 5.14): the
/// socket-mode hooks compare it with bpf_get_netns_cookie() of the connecting socket.
pub fn netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hosts
/// that mount v1 controllers there (hybrid mode).
pub fn root_cgroup() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let found = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| at.to_string())
    });
    found.unwrap_or_else(|| "/sys/fs/cgroup".into()).into()
}

/// Every IPv4 address of this host, on any interface.
pub fn local_ipv4() -> Vec<std::net::Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .collect()
        })
        .unwrap_or_default()
}

/// A DSR VIP's backend that is this host (one of `local`), as (field, message): the data
/// plane would send the client's packet to its own MAC, and it would never leave the NIC.
fn dsr_backend_on_this_host(
    cfg: &crate::config::Config,
    local: &[std::net::Ipv4Addr],
) -> Option<(String, String)> {
    for (i, v) in cfg.vips.iter().enumerate() {
        if !v.mode.is_dsr() {
            continue;
        }
        if let Some(j) = v.backends.iter().position(|b| local.contains(&b.address)) {
            return Some((
                format!("vip[{i}].backend[{j}].address"),
                format!(
                    "{} is an address of this host: in {} mode an LB cannot be its own backend; use mode = \"nat\" here",
                    v.backends[j].address,
                    v.mode.as_str()
                ),
            ));
        }
    }
    None
}

/// What an operator running lb on a control-plane node should know about this config:
/// a local backend on another port than its VIP's (processes on this host cannot use
/// that VIP port), and `local_backend_down` without a local backend (no effect).
fn colocated_warnings(cfg: &crate::config::Config, local: &[std::net::Ipv4Addr]) -> Vec<String> {
    let mut out = Vec::new();
    let mut any_local = false;
    for (i, v) in cfg.vips.iter().enumerate() {
        if v.mode != crate::config::Mode::Nat {
            continue;
        }
        for (j, b) in v.backends.iter().enumerate() {
            if !local.contains(&b.address) {
                continue;
            }
            any_local = true;
            if b.port != v.port {
                out.push(format!(
                    "vip[{i}].backend[{j}]: {}:{} is this host's, behind {}:{}: clients elsewhere \
                     reach it, but processes on this host connecting to {}:{} (a kubelet) reach \
                     nothing while it holds the VIP; prefer port = {} for the VIP (docs/colocated.md)",
                    b.address, b.port, v.address, v.port, v.address, v.port, b.port
                ));
            }
        }
    }
    if let Some(v) = &cfg.vrrp {
        if v.track.local_backend_down > 0 && !any_local {
            out.push(
                "vrrp.track.local_backend_down: no backend is an address of this host; it has no effect"
                    .to_string(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_backend_on_another_port_and_a_needless_track_are_warned_of() {
        let text = |port: u16, track: &str| {
            format!(
                "[agent]\ninterface = \"eth0\"\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\n\
                 port = {port}\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.2\"\nport = 6443\n\
                 [vrrp]\nvirtual_router_id = 1\n{track}"
            )
        };
        let parse =
            |t: &str| crate::config::Config::parse(std::path::Path::new("lb.toml"), t).unwrap();
        let local = ["198.18.0.2".parse().unwrap()];
        assert!(colocated_warnings(&parse(&text(6443, "")), &local).is_empty());
        let w = colocated_warnings(&parse(&text(1644, "")), &local);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("vip[0].backend[0]"), "{w:?}");
        let track = "[vrrp.track]\nlocal_backend_down = 30\n";
        assert!(colocated_warnings(&parse(&text(6443, track)), &local).is_empty());
        let w = colocated_warnings(&parse(&text(6443, track)), &[]);
        assert!(w[0].contains("no effect"), "{w:?}");
    }

    #[test]
    fn a_dsr_lb_is_not_its_own_backend() {
        let text = |mode: &str| {
            format!(
                "[agent]\ninterface = \"eth0\"\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\n\
                 port = 6443\nmode = \"{mode}\"\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n\
                 [[vip.backend]]\nname = \"m2\"\naddress = \"198.18.0.2\"\n"
            )
        };
        let local = ["198.18.0.2".parse().unwrap()];
        let cfg =
            crate::config::Config::parse(std::path::Path::new("lb.toml"), &text("dsr-l2")).unwrap();
        let (field, message) = dsr_backend_on_this_host(&cfg, &local).expect("refused");
        assert_eq!(field, "vip[0].backend[1].address");
        assert!(message.contains("cannot be its own backend"), "{message}");
        let cfg =
            crate::config::Config::parse(std::path::Path::new("lb.toml"), &text("nat")).unwrap();
        assert_eq!(dsr_backend_on_this_host(&cfg, &local), None);
    }

    #[test]
    fn missing_capabilities_are_named() {
        let bit = |c: Cap| 1u64 << c as u32;
        let vrrp = Needs {
            vrrp: true,
            ..Needs::default()
        };
        let run = bit(Cap::Bpf) | bit(Cap::Perfmon) | bit(Cap::NetAdmin) | bit(Cap::NetRaw);
        assert!(missing_caps(run, vrrp).is_empty());
        let sys_admin = bit(Cap::SysAdmin) | bit(Cap::NetAdmin) | bit(Cap::NetRaw);
        assert!(
            missing_caps(sys_admin, vrrp).is_empty(),
            "CAP_SYS_ADMIN stands in for CAP_BPF on older kernels"
        );
        let no_raw = bit(Cap::Bpf) | bit(Cap::Perfmon) | bit(Cap::NetAdmin);
        assert_eq!(
            missing_caps(no_raw, vrrp),
            vec![("CAP_NET_RAW", "VRRP's raw socket and gratuitous ARPs")]
        );
        assert!(
            missing_caps(no_raw, Needs::default()).is_empty(),
            "no VRRP, no raw socket"
        );
        assert_eq!(
            missing_caps(
                run,
                Needs {
                    realtime: true,
                    ..vrrp
                }
            )[0]
            .0,
            "CAP_SYS_NICE"
        );
        let none = missing_caps(0, vrrp);
        assert_eq!(
            none.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
        assert_eq!(
            missing_caps(
                run,
                Needs {
                    group: true,
                    ..vrrp
                }
            )[0]
            .0,
            "CAP_CHOWN",
            "a control group means chown"
        );
        assert_eq!(
            missing_caps(run & !bit(Cap::Perfmon), Needs::default()),
            vec![(
                "CAP_PERFMON",
                "the verifier accepts the XDP program's pointer arithmetic only with it"
            )]
        );
    }
}
