//! `lb-agent backend-setup`: makes an apiserver host a backend of a DSR VIP. The LB leaves
//! the VIP as the packets' destination, so the host must accept packets for the VIP without
//! ever answering ARP for it (the LB owns it on the wire), and answer the client straight
//! from the VIP.
//!
//! dsr-l2: the VIP on `lo`, arp_ignore and arp_announce. dsr-ipip: an ipip device in
//! external mode holding the VIP, or, where the kernel has no ipip device type, the VIP on
//! `lo` and `lb_tc_decap` at tc ingress. A run records what it changed in a state file, so
//! `--undo` takes back exactly that and puts back the sysctl values it replaced.

use std::{
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        tc::{self, NlOptions, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use serde::{Deserialize, Serialize};

use crate::netlink::{Link, Netlink, NetlinkError};

/// The ipip device dsr-ipip creates.
pub const IPIP_DEVICE: &str = "lbipip0";
/// The TC program that strips the outer header where the kernel has no ipip device.
pub const DECAP_PROG: &str = lb_common::PROG_TC_DECAP;
/// Where a run records what it changed, for `--undo`.
pub const DEFAULT_STATE: &str = "/var/lib/lb-agent/backend-setup.json";

const ARP_IGNORE: &str = "net.ipv4.conf.all.arp_ignore";
const ARP_ANNOUNCE: &str = "net.ipv4.conf.all.arp_announce";
/// What `tc filter add` would load: the object is embedded in lb-agent, not on disk.
const TC_OBJECT_NOTE: &str =
    "lb-ebpf.o is the eBPF object embedded in lb-agent; lb_tc_decap is its only classifier";

/// How the LB sends packets to the backends of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The LB rewrites only the destination MAC.
    DsrL2,
    /// The LB encapsulates the packet in an outer IPv4 header addressed to the backend.
    DsrIpip,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::DsrL2 => "dsr-l2",
            Mode::DsrIpip => "dsr-ipip",
        })
    }
}

/// What `lb-agent backend-setup` was asked to do (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// How the LB forwards to this host: `dsr-l2` (MAC rewrite) or `dsr-ipip` (IPIP).
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// The VIP's address.
    #[arg(long)]
    pub vip: Ipv4Addr,
    /// Take back what the setup changed (as recorded in the state file).
    #[arg(long)]
    pub undo: bool,
    /// Print the equivalent shell commands instead of changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// dsr-ipip without kernel ipip: attach the decapsulation program to this interface
    /// only (repeatable; default: every interface that is up, except the loopback).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Where the setup records what it changed, for --undo.
    #[arg(long, default_value = DEFAULT_STATE)]
    pub state: PathBuf,
}

/// Why backend-setup failed; each names the interface, sysctl or file involved.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("must run as root: it changes this host's addresses, sysctls and tc filters (--dry-run shows what it would do)")]
    NotRoot,
    #[error("--interface applies to --mode dsr-ipip only")]
    InterfaceWithL2,
    #[error("interface {0}: no such interface")]
    NoInterface(String),
    #[error("interface {0}: not an Ethernet interface ({DECAP_PROG} reads an Ethernet header)")]
    NotEthernet(String),
    #[error("no interface for {DECAP_PROG}: none is up besides the loopback (name one with --interface)")]
    NoDecapInterface,
    #[error("interface {IPIP_DEVICE} exists but is a {0} device, not ipip: remove or rename it")]
    NotIpip(String),
    #[error("interface {interface}: {error}")]
    Netlink {
        interface: String,
        error: NetlinkError,
    },
    #[error("interface {interface}: {what}: {error}")]
    Tc {
        interface: String,
        what: &'static str,
        error: String,
    },
    #[error("sysctl {name} ({}): {error}", sysctl_path(name).display())]
    Sysctl { name: String, error: io::Error },
    #[error("sysctl {name}: {value:?} is not a number")]
    SysctlValue { name: String, value: String },
    #[error("{DECAP_PROG} from the embedded eBPF object: {0}")]
    Program(String),
    #[error("state file {path}: {error}")]
    State { path: PathBuf, error: io::Error },
    #[error("state file {path}: {error}")]
    StateFormat {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("state file {path}: {vip} is set up for {recorded}; undo that first (--mode {recorded} --undo)")]
    OtherMode {
        path: PathBuf,
        vip: Ipv4Addr,
        recorded: Mode,
    },
}

/// What setups changed on this host, for `--undo`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    vips: Vec<VipRecord>,
    /// The ipip device, when a setup created it.
    #[serde(default)]
    device: Option<String>,
    /// Where a setup attached lb_tc_decap.
    #[serde(default)]
    filters: Vec<FilterRecord>,
    /// Sysctls a setup changed, oldest first.
    #[serde(default)]
    sysctls: Vec<SysctlRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VipRecord {
    vip: Ipv4Addr,
    mode: Mode,
    /// Where the VIP/32 is.
    interface: String,
    /// A setup added the address (false: it was there before).
    added: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FilterRecord {
    interface: String,
    /// The setup also added the clsact qdisc.
    qdisc_added: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SysctlRecord {
    name: String,
    /// The value before the first setup changed it.
    old: String,
    /// The value the last setup wrote.
    new: String,
}

impl State {
    fn load(path: &Path) -> Result<Option<Self>, SetupError> {
        match fs::read(path) {
            Ok(b) => {
                serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|error| SetupError::StateFormat {
                        path: path.into(),
                        error,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(SetupError::State {
                path: path.into(),
                error,
            }),
        }
    }

    fn is_empty(&self) -> bool {
        *self == State::default()
    }

    /// Writes the state, or removes the file when nothing is left to undo.
    fn save(&self, path: &Path) -> Result<(), SetupError> {
        let err = |error| SetupError::State {
            path: path.into(),
            error,
        };
        if self.is_empty() {
            return match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let json = serde_json::to_vec_pretty(self).expect("serializable");
        // Written aside and renamed: a crash never leaves half a record of what to undo.
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, json).map_err(err)?;
        fs::rename(&tmp, path).map_err(err)
    }

    fn record_sysctl(&mut self, name: &str, old: &str, new: &str) {
        match self.sysctls.iter_mut().find(|s| s.name == name) {
            // The value before the first setup is the one to restore.
            Some(s) => s.new = new.into(),
            None => self.sysctls.push(SysctlRecord {
                name: name.into(),
                old: old.into(),
                new: new.into(),
            }),
        }
    }
}

/// Runs `lb-agent backend-setup`, writing one line per change (the shell commands with
/// `dry_run`) to `out`.
pub async fn run(opts: &Options, out: &mut dyn Write) -> Result<(), SetupError> {
    if !opts.dry_run && !nix::unistd::geteuid().is_root() {
        return Err(SetupError::NotRoot);
    }
    if opts.mode == Mode::DsrL2 && !opts.interfaces.is_empty() {
        return Err(SetupError::InterfaceWithL2);
    }
    let nl = Netlink::connect().map_err(|e| SetupError::Netlink {
        interface: "(netlink socket)".into(),
        error: NetlinkError {
            op: "connect".into(),
            source: e,
        },
    })?;
    let loaded = State::load(&opts.state)?;
    let had_state = loaded.is_some();
    let mut s = Setup {
        opts,
        nl,
        out,
        changes: 0,
        ebpf: None,
        state: loaded.clone().unwrap_or_default(),
        object_noted: false,
    };
    let result = if opts.undo {
        s.undo(had_state).await
    } else {
        s.setup().await
    };
    // Whatever happened before a failure is recorded, so --undo can take it back.
    if !opts.dry_run && loaded.unwrap_or_default() != s.state {
        s.state.save(&opts.state)?;
    }
    result?;
    if s.changes == 0 {
        let what = if opts.undo {
            format!("nothing to undo for {} ({})", opts.vip, opts.mode)
        } else {
            format!(
                "no change: {} for {} is already set up",
                opts.mode, opts.vip
            )
        };
        s.note(&what);
    }
    Ok(())
}

/// One run: the connection, the state being recorded, and what was said.
struct Setup<'a> {
    opts: &'a Options,
    nl: Netlink,
    out: &'a mut dyn Write,
    changes: usize,
    /// The embedded object, loaded the first time lb_tc_decap is attached.
    ebpf: Option<Ebpf>,
    state: State,
    /// A dry run said where lb-ebpf.o comes from.
    object_noted: bool,
}

impl Setup<'_> {
    /// A change: the command with --dry-run, what was done otherwise.
    fn changed(&mut self, command: &str, done: &str) {
        self.changes += 1;
        let line = if self.opts.dry_run { command } else { done };
        let _ = writeln!(self.out, "{line}");
    }

    /// Not a change; a comment in a dry run's script.
    fn note(&mut self, what: &str) {
        let _ = if self.opts.dry_run {
            writeln!(self.out, "# {what}")
        } else {
            writeln!(self.out, "{what}")
        };
    }

    fn nl_err(interface: &str) -> impl FnOnce(NetlinkError) -> SetupError + '_ {
        move |error| SetupError::Netlink {
            interface: interface.into(),
            error,
        }
    }

    async fn links(&self) -> Result<Vec<Link>, SetupError> {
        self.nl.links().await.map_err(Self::nl_err("(all)"))
    }

    async fn setup(&mut self) -> Result<(), SetupError> {
        let vip = self.opts.vip;
        if let Some(r) = self.state.vips.iter().find(|r| r.vip == vip) {
            if r.mode != self.opts.mode {
                return Err(SetupError::OtherMode {
                    path: self.opts.state.clone(),
                    vip,
                    recorded: r.mode,
                });
            }
        }
        let links = self.links().await?;
        let lo = loopback(&links)?;
        match self.opts.mode {
            Mode::DsrL2 => self.ensure_address(&lo.name, Some(lo.index)).await?,
            Mode::DsrIpip => {
                if self.ipip_device(&links).await? {
                    self.setup_ipip_device().await?;
                } else {
                    self.note(&format!(
                        "this kernel has no ipip device type: the VIP goes on {} and {DECAP_PROG} strips the outer header at tc ingress",
                        lo.name
                    ));
                    self.ensure_address(&lo.name, Some(lo.index)).await?;
                    for link in self.decap_targets(&links)? {
                        self.ensure_decap(&link).await?;
                    }
                }
            }
        }
        // The host must never answer ARP for the VIP (the LB owns it on the wire) nor use
        // it as the source of its own ARP requests.
        self.raise(ARP_IGNORE, 1)?;
        self.raise(ARP_ANNOUNCE, 2)
    }

    /// Whether the ipip device is there or could be created (created unless a dry run).
    async fn ipip_device(&mut self, links: &[Link]) -> Result<bool, SetupError> {
        if let Some(l) = links.iter().find(|l| l.name == IPIP_DEVICE) {
            return match l.kind.as_deref() {
                Some("ipip") => Ok(true),
                other => Err(SetupError::NotIpip(other.unwrap_or("hardware").into())),
            };
        }
        if self.opts.dry_run {
            let ok = kernel_has_ipip();
            if ok {
                self.changed(&format!("ip link add {IPIP_DEVICE} type ipip external"), "");
            }
            return Ok(ok);
        }
        match self.nl.add_ipip_external(IPIP_DEVICE).await {
            Ok(()) => {
                self.state.device = Some(IPIP_DEVICE.into());
                self.changed("", &format!("created {IPIP_DEVICE} (ipip, external mode)"));
                Ok(true)
            }
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(Self::nl_err(IPIP_DEVICE)(e)),
        }
    }

    /// The VIP on the ipip device, the device up, and rp_filter loose on it.
    async fn setup_ipip_device(&mut self) -> Result<(), SetupError> {
        let dev = match self.nl.link_by_name(IPIP_DEVICE).await {
            Ok(l) => Some(l),
            Err(_) if self.opts.dry_run => None,
            Err(e) => return Err(Self::nl_err(IPIP_DEVICE)(e)),
        };
        self.ensure_address(IPIP_DEVICE, dev.as_ref().map(|d| d.index))
            .await?;
        if !dev.as_ref().is_some_and(|d| d.up) {
            if let Some(d) = &dev {
                if !self.opts.dry_run {
                    self.nl
                        .set_up(d.index)
                        .await
                        .map_err(Self::nl_err(IPIP_DEVICE))?;
                }
            }
            self.changed(
                &format!("ip link set {IPIP_DEVICE} up"),
                &format!("set {IPIP_DEVICE} up"),
            );
        }
        // The inner source is a client routed through another interface: strict reverse
        // path filtering (1; the kernel uses the larger of "all" and the device's value)
        // would drop every packet. Loose (2) only wants some route back.
        let all = read_number("net.ipv4.conf.all.rp_filter")?;
        let name = format!("net.ipv4.conf.{IPIP_DEVICE}.rp_filter");
        let dev_value = if dev.is_some() {
            read_sysctl(&name)?
        } else {
            read_sysctl("net.ipv4.conf.default.rp_filter")?
        };
        let n = parse_number(&name, &dev_value)?;
        if all.max(n) == 1 {
            self.set_sysctl(&name, &dev_value, "2")?;
        }
        Ok(())
    }

    /// Adds VIP/32 to `interface` unless it is there; `index` is None only in a dry run,
    /// for a device not created yet.
    async fn ensure_address(
        &mut self,
        interface: &str,
        index: Option<u32>,
    ) -> Result<(), SetupError> {
        let vip = self.opts.vip;
        let present = match index {
            Some(i) => self
                .nl
                .addresses(i)
                .await
                .map_err(Self::nl_err(interface))?
                .iter()
                .any(|a| a.addr == vip && a.prefix == 32),
            None => false,
        };
        if !present {
            if let (Some(i), false) = (index, self.opts.dry_run) {
                self.nl
                    .add_address(i, vip, 32, None)
                    .await
                    .map_err(Self::nl_err(interface))?;
            }
            self.changed(
                &format!("ip addr add {vip}/32 dev {interface}"),
                &format!("added {vip}/32 to {interface}"),
            );
        }
        let mode = self.opts.mode;
        match self.state.vips.iter_mut().find(|r| r.vip == vip) {
            Some(r) => r.added |= !present,
            None => self.state.vips.push(VipRecord {
                vip,
                mode,
                interface: interface.into(),
                added: !present,
            }),
        }
        Ok(())
    }

    /// The links lb_tc_decap goes on: those named with --interface, or every link that is
    /// up, not the loopback, and has an Ethernet header (the program parses one).
    fn decap_targets(&self, links: &[Link]) -> Result<Vec<Link>, SetupError> {
        if !self.opts.interfaces.is_empty() {
            return self
                .opts
                .interfaces
                .iter()
                .map(|name| {
                    let l = links
                        .iter()
                        .find(|l| &l.name == name)
                        .ok_or_else(|| SetupError::NoInterface(name.clone()))?;
                    if l.mac.is_none() || l.loopback {
                        return Err(SetupError::NotEthernet(name.clone()));
                    }
                    Ok(l.clone())
                })
                .collect();
        }
        let up: Vec<Link> = links
            .iter()
            .filter(|l| l.up && !l.loopback && l.mac.is_some())
            .cloned()
            .collect();
        if up.is_empty() {
            return Err(SetupError::NoDecapInterface);
        }
        Ok(up)
    }

    /// Attaches lb_tc_decap to `link`'s ingress unless it is there, adding clsact first if
    /// the link has none.
    async fn ensure_decap(&mut self, link: &Link) -> Result<(), SetupError> {
        let name = link.name.as_str();
        let filters = self
            .nl
            .tc_filters(link.index, false)
            .await
            .map_err(Self::nl_err(name))?;
        if filters
            .iter()
            .any(|f| f.bpf_name.as_deref() == Some(DECAP_PROG))
        {
            return Ok(());
        }
        let has_clsact = self
            .nl
            .has_clsact(link.index)
            .await
            .map_err(Self::nl_err(name))?;
        if !has_clsact {
            if !self.opts.dry_run {
                tc::qdisc_add_clsact(name).map_err(|e| SetupError::Tc {
                    interface: name.into(),
                    what: "adding the clsact qdisc",
                    error: error_chain(&e),
                })?;
            }
            self.changed(
                &format!("tc qdisc add dev {name} clsact"),
                &format!("added clsact qdisc to {name}"),
            );
        }
        if self.opts.dry_run {
            if !self.object_noted {
                self.object_noted = true;
                self.note(TC_OBJECT_NOTE);
            }
        } else {
            self.attach_decap(name)?;
        }
        self.changed(
            &format!(
                "tc filter add dev {name} ingress bpf direct-action obj lb-ebpf.o sec classifier"
            ),
            &format!("attached {DECAP_PROG} to {name} ingress"),
        );
        if !self.state.filters.iter().any(|f| f.interface == name) {
            self.state.filters.push(FilterRecord {
                interface: name.into(),
                qdisc_added: !has_clsact,
            });
        }
        Ok(())
    }

    /// Loads lb_tc_decap (once) and attaches it through netlink: a cls_bpf filter holds the
    /// program, so it stays when this process exits (a TCX link would go with it).
    fn attach_decap(&mut self, interface: &str) -> Result<(), SetupError> {
        if self.ebpf.is_none() {
            self.ebpf = Some(load_decap()?);
        }
        let prog = decap_program(self.ebpf.as_mut().expect("loaded"))?;
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| SetupError::Tc {
                interface: interface.into(),
                what: "attaching lb_tc_decap",
                error: error_chain(&e),
            })?;
        let link = prog.take_link(id).map_err(|e| SetupError::Tc {
            interface: interface.into(),
            what: "taking the filter",
            error: error_chain(&e),
        })?;
        // Dropping the link would delete the filter.
        std::mem::forget(link);
        Ok(())
    }

    /// Sets sysctl `name` to `min` if it is lower.
    fn raise(&mut self, name: &str, min: u32) -> Result<(), SetupError> {
        let old = read_sysctl(name)?;
        if parse_number(name, &old)? >= min {
            return Ok(());
        }
        self.set_sysctl(name, &old, &min.to_string())
    }

    fn set_sysctl(&mut self, name: &str, old: &str, new: &str) -> Result<(), SetupError> {
        if !self.opts.dry_run {
            write_sysctl(name, new)?;
            self.state.record_sysctl(name, old, new);
        }
        self.changed(
            &format!("sysctl -w {name}={new}"),
            &format!("{name}: {old} -> {new}"),
        );
        Ok(())
    }

    async fn undo(&mut self, had_state: bool) -> Result<(), SetupError> {
        let vip = self.opts.vip;
        let record = self.state.vips.iter().find(|r| r.vip == vip).cloned();
        let mode = record.as_ref().map_or(self.opts.mode, |r| r.mode);
        let links = self.links().await?;

        // The address: where the record says, or wherever a setup could have put it.
        let places: Vec<String> = match &record {
            Some(r) if r.added => vec![r.interface.clone()],
            Some(r) => {
                self.note(&format!(
                    "{vip}/32 on {} was there before backend-setup: left",
                    r.interface
                ));
                vec![]
            }
            None => vec![loopback(&links)?.name.clone(), IPIP_DEVICE.into()],
        };
        for name in places {
            let Some(l) = links.iter().find(|l| l.name == name) else {
                continue;
            };
            let addrs = self
                .nl
                .addresses(l.index)
                .await
                .map_err(Self::nl_err(&name))?;
            if addrs.iter().any(|a| a.addr == vip && a.prefix == 32) {
                if !self.opts.dry_run {
                    self.nl
                        .del_address(l.index, vip, 32)
                        .await
                        .map_err(Self::nl_err(&name))?;
                }
                self.changed(
                    &format!("ip addr del {vip}/32 dev {name}"),
                    &format!("removed {vip}/32 from {name}"),
                );
            }
        }
        self.state.vips.retain(|r| r.vip != vip);

        // What VIPs still set up share: the device, the filters, the sysctls.
        let others: Vec<String> = self.state.vips.iter().map(|r| r.vip.to_string()).collect();
        let ipip_others: Vec<String> = self
            .state
            .vips
            .iter()
            .filter(|r| r.mode == Mode::DsrIpip)
            .map(|r| r.vip.to_string())
            .collect();
        if mode == Mode::DsrIpip {
            if ipip_others.is_empty() {
                self.undo_decap(&links, had_state).await?;
                self.undo_device(&links, had_state).await?;
            } else {
                self.note(&format!(
                    "{IPIP_DEVICE} and {DECAP_PROG} (if any) kept: {} still use them",
                    ipip_others.join(", ")
                ));
            }
        }
        if !had_state {
            let values: Vec<String> = [ARP_IGNORE, ARP_ANNOUNCE]
                .iter()
                .map(|n| format!("{n} = {}", read_sysctl(n).unwrap_or_else(|_| "?".into())))
                .collect();
            self.note(&format!(
                "no state file {}: sysctls left as they are ({})",
                self.opts.state.display(),
                values.join(", ")
            ));
        } else if !others.is_empty() {
            self.note(&format!("sysctls kept: {} still set up", others.join(", ")));
        } else {
            self.restore_sysctls()?;
        }
        Ok(())
    }

    /// Detaches lb_tc_decap where a setup attached it (everywhere it is, without a state
    /// file), and the clsact qdiscs a setup added once nothing else is on them.
    async fn undo_decap(&mut self, links: &[Link], had_state: bool) -> Result<(), SetupError> {
        let places: Vec<(String, bool)> = if had_state {
            self.state
                .filters
                .iter()
                .map(|f| (f.interface.clone(), f.qdisc_added))
                .collect()
        } else {
            links
                .iter()
                .filter(|l| !l.loopback)
                .map(|l| (l.name.clone(), true))
                .collect()
        };
        for (name, qdisc_added) in places {
            let Some(link) = links.iter().find(|l| l.name == name) else {
                self.note(&format!("{name} is gone, and {DECAP_PROG} with it"));
                self.state.filters.retain(|f| f.interface != name);
                continue;
            };
            let ingress = self
                .nl
                .tc_filters(link.index, false)
                .await
                .map_err(Self::nl_err(&name))?;
            let (ours, mut rest): (Vec<_>, Vec<_>) = ingress
                .into_iter()
                .partition(|f| f.bpf_name.as_deref() == Some(DECAP_PROG));
            for f in &ours {
                self.changed(
                    &format!(
                        "tc filter del dev {name} ingress pref {} handle {:#x} bpf",
                        f.priority, f.handle
                    ),
                    &format!("detached {DECAP_PROG} from {name} ingress"),
                );
            }
            if !ours.is_empty() && !self.opts.dry_run {
                tc::qdisc_detach_program(&name, TcAttachType::Ingress, DECAP_PROG).map_err(
                    |e| SetupError::Tc {
                        interface: name.clone(),
                        what: "detaching lb_tc_decap",
                        error: error_chain(&e),
                    },
                )?;
            }
            rest.extend(
                self.nl
                    .tc_filters(link.index, true)
                    .await
                    .map_err(Self::nl_err(&name))?,
            );
            // Without a state file only a clsact this program was alone on is taken away.
            let ours_alone = had_state || !ours.is_empty();
            if qdisc_added
                && ours_alone
                && rest.is_empty()
                && self
                    .nl
                    .has_clsact(link.index)
                    .await
                    .map_err(Self::nl_err(&name))?
            {
                if !self.opts.dry_run {
                    self.nl
                        .del_clsact(link.index)
                        .await
                        .map_err(Self::nl_err(&name))?;
                }
                self.changed(
                    &format!("tc qdisc del dev {name} clsact"),
                    &format!("removed clsact qdisc from {name}"),
                );
            } else if qdisc_added && had_state && !rest.is_empty() {
                self.note(&format!(
                    "clsact qdisc on {name} kept: other filters are on it"
                ));
            }
            self.state.filters.retain(|f| f.interface != name);
        }
        Ok(())
    }

    /// Deletes the ipip device if a setup created it (if it is there, without a state file).
    async fn undo_device(&mut self, links: &[Link], had_state: bool) -> Result<(), SetupError> {
        if had_state && self.state.device.is_none() {
            return Ok(());
        }
        let dev = links
            .iter()
            .find(|l| l.name == IPIP_DEVICE && l.kind.as_deref() == Some("ipip"));
        if let Some(d) = dev {
            if !self.opts.dry_run {
                self.nl
                    .del_link(d.index)
                    .await
                    .map_err(Self::nl_err(IPIP_DEVICE))?;
            }
            self.changed(
                &format!("ip link del {IPIP_DEVICE}"),
                &format!("deleted {IPIP_DEVICE}"),
            );
        }
        if !self.opts.dry_run {
            self.state.device = None;
            // Its sysctls went with it.
            let prefix = format!("net.ipv4.conf.{IPIP_DEVICE}.");
            self.state.sysctls.retain(|s| !s.name.starts_with(&prefix));
        }
        Ok(())
    }

    /// Puts back every sysctl value a setup replaced, newest first, unless someone changed
    /// it since.
    fn restore_sysctls(&mut self) -> Result<(), SetupError> {
        let records: Vec<SysctlRecord> = self.state.sysctls.iter().rev().cloned().collect();
        for r in records {
            match read_sysctl(&r.name) {
                Err(SetupError::Sysctl { error, .. })
                    if error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
                Ok(now) if now == r.new => {
                    if !self.opts.dry_run {
                        write_sysctl(&r.name, &r.old)?;
                    }
                    self.changed(
                        &format!("sysctl -w {}={}", r.name, r.old),
                        &format!("{}: {} -> {} (restored)", r.name, r.new, r.old),
                    );
                }
                Ok(now) => self.note(&format!(
                    "{} is {now}, not the {} backend-setup set: left",
                    r.name, r.new
                )),
            }
            if !self.opts.dry_run {
                self.state.sysctls.retain(|s| s.name != r.name);
            }
        }
        Ok(())
    }
}

fn loopback(links: &[Link]) -> Result<&Link, SetupError> {
    links
        .iter()
        .find(|l| l.loopback)
        .ok_or_else(|| SetupError::NoInterface("lo".into()))
}

/// Loads the embedded object with lb_tc_decap loaded into the kernel (not attached). Its maps are created with it: made as
/// small as they can be, since nothing uses them and FLOWS alone would take hundreds of
/// megabytes of an apiserver host's memory for as long as the load takes.
pub fn load_decap() -> Result<Ebpf, SetupError> {
    use crate::dataplane::OBJECT;
    let object =
        aya_obj::Object::parse(OBJECT).map_err(|e| SetupError::Program(error_chain(&e)))?;
    // Hash, array, per-CPU and LRU kinds: any size is valid for them.
    const SHRINKABLE: [u32; 6] = [1, 2, 5, 6, 9, 10];
    let mut loader = EbpfLoader::new();
    for (name, m) in &object.maps {
        if !name.starts_with('.') && SHRINKABLE.contains(&m.map_type()) {
            loader.map_max_entries(name, 1);
        }
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| SetupError::Program(error_chain(&e)))?;
    decap_program(&mut ebpf)?
        .load()
        .map_err(|e| SetupError::Program(error_chain(&e)))?;
    Ok(ebpf)
}

fn decap_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, SetupError> {
    ebpf.program_mut(DECAP_PROG)
        .ok_or_else(|| SetupError::Program("not in the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| SetupError::Program(error_chain(&e)))
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cause = c.source();
    }
    s
}

/// Where sysctl `name` (dotted) lives under /proc/sys.
fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

fn read_sysctl(name: &str) -> Result<String, SetupError> {
    fs::read_to_string(sysctl_path(name))
        .map(|v| v.trim().to_string())
        .map_err(|error| SetupError::Sysctl {
            name: name.into(),
            error,
        })
}

fn write_sysctl(name: &str, value: &str) -> Result<(), SetupError> {
    fs::write(sysctl_path(name), value).map_err(|error| SetupError::Sysctl {
        name: name.into(),
        error,
    })
}

fn parse_number(name: &str, value: &str) -> Result<u32, SetupError> {
    value.parse().map_err(|_| SetupError::SysctlValue {
        name: name.into(),
        value: value.into(),
    })
}

fn read_number(name: &str) -> Result<u32, SetupError> {
    parse_number(name, &read_sysctl(name)?)
}

/// Whether this kernel can make ipip devices, as far as can be told without making one (a
/// dry run): the module is loaded, built in, or installed.
fn kernel_has_ipip() -> bool {
    if Path::new("/sys/module/ipip").exists() {
        return true;
    }
    let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let dir = Path::new("/lib/modules").join(release.trim());
    ["modules.builtin", "modules.dep"]
        .iter()
        .any(|f| fs::read_to_string(dir.join(f)).is_ok_and(|list| lists_ipip(&list)))
}

/// Whether a modules.dep or modules.builtin lists the ipip module.
fn lists_ipip(list: &str) -> bool {
    list.lines().any(|l| {
        let path = l.split(':').next().unwrap_or_default();
        let file = path.rsplit('/').next().unwrap_or_default();
        file == "ipip.ko" || file.starts_with("ipip.ko.")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_lists_are_read_by_file_name() {
        assert!(lists_ipip(
            "kernel/net/ipv4/ip_tunnel.ko.zst:\nkernel/net/ipv4/ipip.ko.zst: kernel/net/ipv4/tunnel4.ko.zst\n"
        ));
        assert!(lists_ipip("kernel/net/ipv4/ipip.ko\n"));
        assert!(!lists_ipip(
            "kernel/net/ipv6/ip6_tunnel.ko:\nkernel/net/ipv4/ipip6.ko:\n"
        ));
    }

    #[test]
    fn a_sysctl_keeps_the_value_before_the_first_setup() {
        let mut s = State::default();
        s.record_sysctl(ARP_IGNORE, "0", "1");
        s.record_sysctl(ARP_IGNORE, "1", "2");
        assert_eq!(
            s.sysctls,
            vec![SysctlRecord {
                name: ARP_IGNORE.into(),
                old: "0".into(),
                new: "2".into()
            }]
        );
    }

    #[test]
    fn the_state_file_round_trips_and_an_empty_one_is_removed() {
        let dir = std::env::temp_dir().join(format!("lb-setup-state-{}", std::process::id()));
        let path = dir.join("sub/state.json");
        let mut s = State::default();
        s.vips.push(VipRecord {
            vip: Ipv4Addr::new(198, 18, 0, 100),
            mode: Mode::DsrIpip,
            interface: "lo".into(),
            added: true,
        });
        s.filters.push(FilterRecord {
            interface: "eth0".into(),
            qdisc_added: true,
        });
        s.record_sysctl(ARP_ANNOUNCE, "0", "2");
        s.save(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"dsr-ipip\""), "{text}");
        assert_eq!(State::load(&path).unwrap(), Some(s));
        State::default().save(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(State::load(&path).unwrap(), None);
        fs::write(&path, "{").unwrap();
        assert!(matches!(
            State::load(&path),
            Err(SetupError::StateFormat { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sysctl_names_map_to_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.lbipip0.rp_filter"),
            Path::new("/proc/sys/net/ipv4/conf/lbipip0/rp_filter")
        );
    }
}
