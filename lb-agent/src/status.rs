//! `lb-agent status`: what is in the data plane's maps, plus what the agent says about itself.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use lb_common::{
    maglev_index, mode, name_str, reason, state, xdp_mode, TrafficStats, MAP_LAYOUT_VERSION,
    MAX_BACKENDS, NO_BACKEND,
};
use serde::Serialize;

use crate::{
    backends::BackendHealth,
    control::{self, Request},
    dataplane::{map_err, pinned::PinnedMaps, DataplaneError},
    discovery::DiscoveryStatus,
    vrrp::VrrpStatus,
};

/// Why status cannot report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("lb-agent is not running: no maps are pinned under {pin_path}{agent}")]
    NotRunning { pin_path: PathBuf, agent: String },
    #[error("cannot read the pinned maps under {pin_path}: {source} (status needs read access to the pins: run it as root, or as a member of agent.control_socket_group)")]
    Denied {
        pin_path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// The flow tables' sizes and what they cost.
#[derive(Debug, Serialize, Default)]
pub struct FlowTable {
    /// Connections FLOWS holds (two entries each).
    pub capacity: u64,
    /// Half-open connections HALF_OPEN holds.
    pub half_open_capacity: u64,
    /// Connections of DSR VIPs DSR_FLOWS holds.
    pub dsr_capacity: u64,
    /// Kernel memory of FLOWS, HALF_OPEN and DSR_FLOWS (fdinfo's memlock), bytes.
    pub bytes: u64,
    /// Kernel memory of all of lb's maps, bytes.
    pub all_maps_bytes: u64,
}

/// Everything `lb-agent status` shows; `--json` prints it as is.
#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub agent: AgentStatus,
    /// The config file the agent runs with, when the agent answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigStatus>,
    /// Established connections in the flow table (all VIPs).
    pub flows: u64,
    /// Connections whose backend has not answered past the handshake yet.
    pub half_open: u64,
    /// Connections of DSR VIPs (the LB sees only the client's side of them).
    pub dsr_flows: u64,
    /// Sizes and memory of the flow tables.
    pub flow_table: FlowTable,
    pub vips: Vec<VipStatus>,
    /// Per-CPU counters summed, by reason name.
    pub counters: BTreeMap<String, u64>,
    /// VRRP, when configured and the agent answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<VrrpStatus>,
}

/// The loaded config file's identity (from the agent).
#[derive(Debug, Serialize, Default)]
pub struct ConfigStatus {
    /// Absolute path.
    pub path: String,
    /// SHA-256 of the file's bytes as loaded, hex.
    pub sha256: String,
    /// When it was loaded, RFC 3339 (UTC).
    pub loaded_at: String,
}

#[derive(Debug, Serialize, Default)]
pub struct AgentStatus {
    /// The control socket answered.
    pub running: bool,
    pub pid: u32,
    pub interface: String,
    pub ifindex: u32,
    /// "native", "generic" or "none" (also when every VIP is in socket mode: no interface).
    pub xdp_mode: String,
    /// The socket-mode hooks (connect4, getpeername4) are pinned, so attached to the cgroup.
    pub socket_hooks: bool,
    pub pin_path: String,
    pub control_socket: String,
    pub uptime_seconds: u64,
    /// The running agent's version (from the agent).
    pub version: String,
    /// Layout version of the pinned maps, as the agent that pinned them wrote it (0: pinned
    /// before layouts were versioned).
    pub map_layout_version: u32,
    /// The layout version this lb-agent binary reads and writes.
    pub expected_map_layout_version: u32,
    /// Why the control socket did not answer, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_error: Option<String>,
    /// Map entries the agent found wrong and repaired (from the agent).
    pub map_repairs: u64,
    /// The last repair, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_map_repair: Option<String>,
    /// Map writes that failed and were retried (from the agent).
    pub map_write_failures: u64,
    /// A map write has not landed yet: the data plane is behind the agent.
    pub maps_behind: bool,
    /// The `lb-agent restart` this agent continues, if one started it.
    pub restarted_by: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// "nat", "dsr-l2" or "dsr-ipip".
    pub mode: String,
    /// NAT only (empty in DSR modes).
    pub snat_address: String,
    /// NAT only (empty in DSR modes).
    pub snat_ports: String,
    /// dsr-ipip: the network each flow's outer source address comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipip_source: Option<String>,
    pub maglev_table_size: u32,
    /// Largest MSS the VIP's SYNs and SYN-ACKs may announce; null: no clamp.
    pub mss_clamp: Option<u16>,
    /// Probe kind ("https", "http", "tcp", "none"), from the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Panic mode: why backends whose probes fail are served anyway (from the agent).
    pub health_panic: Option<String>,
    /// With `[vip.discovery]`: where the backend list comes from, the kubernetes
    /// EndpointSlice or the configured seed (from the agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize, Default)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    /// "up", "down" or "drain".
    pub state: String,
    /// An address of the LB host (lb on a control-plane node): its connections pass to
    /// the local stack, not NATed.
    pub local: bool,
    pub weight: u32,
    /// Slots of the live Maglev table it owns.
    pub slots: u32,
    /// Entries in the flow table that point at it.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Probe details from the agent (absent when it does not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<BackendHealth>,
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn sum(values: &[TrafficStats]) -> TrafficStats {
    values
        .iter()
        .fold(TrafficStats::default(), |a, s| TrafficStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_flows: a.new_flows + s.new_flows,
            reply_packets: a.reply_packets + s.reply_packets,
            reply_bytes: a.reply_bytes + s.reply_bytes,
        })
}

/// Reads the pinned maps under `pin_path` and asks the agent at `control_socket`.
pub fn gather(pin_path: &Path, control_socket: &Path) -> Result<Report, StatusError> {
    gather_from(
        pin_path,
        control_socket,
        control::request(control_socket, &Request::Status),
    )
}

/// As `gather`, with the agent's answer already in hand (the agent's own metrics endpoint
/// asks its keeper directly).
pub fn gather_from(
    pin_path: &Path,
    control_socket: &Path,
    answer: Result<control::Response, control::ControlError>,
) -> Result<Report, StatusError> {
    if !PinnedMaps::present(pin_path) {
        let agent = match &answer {
            Ok(_) => format!(" (but an agent answers on {})", control_socket.display()),
            Err(_) => format!(" and nothing answers on {}", control_socket.display()),
        };
        return Err(StatusError::NotRunning {
            pin_path: pin_path.to_path_buf(),
            agent,
        });
    }
    let maps = match PinnedMaps::open_read_only(pin_path) {
        Ok(m) => m,
        Err(DataplaneError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::EACCES) | Some(libc::EPERM)
            ) =>
        {
            return Err(StatusError::Denied {
                pin_path: pin_path.to_path_buf(),
                source,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let meta = maps
        .agent_meta
        .get(&0, 0)
        .map_err(map_err(lb_common::map::AGENT_META))?;
    let (running, info, control_error, health, vrrp, discovery) = match answer {
        Ok(r) => (
            true,
            r.agent.unwrap_or_default(),
            None,
            r.health.unwrap_or_default(),
            r.vrrp,
            r.discovery.unwrap_or_default(),
        ),
        Err(e) => (
            false,
            Default::default(),
            Some(e.to_string()),
            Vec::new(),
            None,
            Vec::new(),
        ),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let config = (running && !info.config_sha256.is_empty()).then(|| ConfigStatus {
        path: info.config.clone(),
        sha256: info.config_sha256.clone(),
        loaded_at: rfc3339(info.config_loaded_unix),
    });
    let agent = AgentStatus {
        running,
        pid: meta.pid,
        interface: if info.interface.is_empty() {
            nix::net::if_::if_indextoname(meta.ifindex)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            info.interface.clone()
        },
        ifindex: meta.ifindex,
        xdp_mode: xdp_mode::name(meta.xdp_mode).to_string(),
        socket_hooks: pin_path.join(lb_common::LINK_CONNECT4_PIN).exists(),
        pin_path: pin_path.display().to_string(),
        control_socket: control_socket.display().to_string(),
        uptime_seconds: now.saturating_sub(meta.started_unix),
        version: info.version,
        map_layout_version: meta.layout_version,
        expected_map_layout_version: MAP_LAYOUT_VERSION,
        control_error,
        map_repairs: info.map_repairs,
        last_map_repair: info.last_map_repair,
        map_write_failures: info.map_write_failures,
        maps_behind: info.maps_behind,
        restarted_by: info.restarted_by,
    };

    let counts = maps.flows_by_backend(None);
    let (flows_by_backend, flows, half_open, dsr_flows) = (
        counts.by_backend,
        counts.flows,
        counts.half_open,
        counts.dsr,
    );
    let flow_table = maps.flow_table();

    let mut vip_entries: Vec<_> = maps.vips.iter().filter_map(Result::ok).collect();
    vip_entries.sort_by_key(|(_, info)| info.index);
    let mut vips = Vec::new();
    for (key, info) in vip_entries {
        let name = maps
            .vip_meta
            .get(&info.index, 0)
            .map(|m| name_str(&m.name))
            .unwrap_or_default();
        let stats = sum(&maps
            .stats_vip
            .get(&info.index, 0)
            .map(|v| v.iter().copied().collect::<Vec<_>>())
            .unwrap_or_default());
        let table = maps
            .maglev_read(
                maglev_index(info.index, info.active_half, 0),
                info.table_size,
            )
            .unwrap_or_default();
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for b in table.iter().filter(|&&b| b != NO_BACKEND) {
            *slots.entry(*b).or_default() += 1;
        }
        let mut vs = VipStatus {
            name,
            address: ip(key.addr).to_string(),
            port: u16::from_be(key.port),
            protocol: "tcp".into(),
            mode: mode::name(info.mode).into(),
            snat_address: if info.mode == mode::NAT {
                ip(info.snat_addr).to_string()
            } else {
                String::new()
            },
            snat_ports: if info.mode == mode::NAT {
                format!("{}-{}", info.snat_port_min, info.snat_port_max)
            } else {
                String::new()
            },
            ipip_source: (info.mode == mode::DSR_IPIP).then(|| {
                format!(
                    "{}/{}",
                    ip(info.encap_src),
                    u32::from_be(info.encap_src_mask).leading_zeros()
                )
            }),
            maglev_table_size: info.table_size,
            mss_clamp: (info.mss_clamp != 0).then_some(info.mss_clamp),
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
            ..Default::default()
        };
        let vh = health.iter().find(|h| h.name == vs.name);
        vs.probe = vh.map(|h| h.probe.clone());
        vs.health_panic = vh.and_then(|h| h.panic.clone());
        vs.discovery = discovery.iter().find(|d| d.vip == vs.name).cloned();
        for i in 0..MAX_BACKENDS {
            let Ok(bm) = maps.backend_meta.get(&i, 0) else {
                continue;
            };
            if bm.in_use == 0 {
                continue;
            }
            let Ok(b) = maps.backends.get(&i, 0) else {
                continue;
            };
            if b.vip != info.index || b.state == state::UNUSED {
                continue;
            }
            let s = sum(&maps
                .stats_backend
                .get(&i, 0)
                .map(|v| v.iter().copied().collect::<Vec<_>>())
                .unwrap_or_default());
            let f = flows_by_backend.get(&i).copied().unwrap_or(0);
            vs.flows += f;
            vs.backends.push(BackendStatus {
                name: name_str(&bm.name),
                address: ip(b.addr).to_string(),
                port: u16::from_be(b.port),
                state: state::name(b.state).to_string(),
                local: b.flags & lb_common::backend_info_flags::LOCAL != 0,
                weight: bm.weight,
                slots: slots.get(&i).copied().unwrap_or(0),
                flows: f,
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                reply_packets: s.reply_packets,
                reply_bytes: s.reply_bytes,
                health: vh.and_then(|h| {
                    h.backends
                        .iter()
                        .find(|b| b.name == name_str(&bm.name))
                        .cloned()
                }),
            });
        }
        vips.push(vs);
    }

    let mut counters = BTreeMap::new();
    for (i, name) in reason::NAMES.iter().enumerate() {
        let v: u64 = maps
            .stats_reason
            .get(&(i as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        counters.insert(name.to_string(), v);
    }
    Ok(Report {
        agent,
        config,
        flows,
        half_open,
        dsr_flows,
        flow_table,
        vips,
        counters,
        vrrp,
    })
}

/// Unix seconds as RFC 3339 in UTC, to the second.
fn rfc3339(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The pinned maps' layout version, and plainly whether this binary expects another.
fn layout_words(pinned: u32, expected: u32) -> String {
    match pinned {
        p if p == expected => format!("map layout {p}"),
        0 => format!(
            "map layout 0 (pinned before layouts were versioned; this lb-agent expects {expected})"
        ),
        p => format!("map layout {p} (this lb-agent expects {expected})"),
    }
}

/// Which agent, with which config file, over which map layout.
fn identity_line(r: &Report) -> String {
    let a = &r.agent;
    let agent = if a.running {
        format!(
            "lb-agent {}{}",
            a.version,
            if a.restarted_by.is_some() {
                " (restarted in place)"
            } else {
                ""
            }
        )
    } else {
        "lb-agent unknown (not answering)".to_string()
    };
    let config = match &r.config {
        Some(c) => format!(
            "config {} (sha256 {}, loaded {})",
            c.path,
            c.sha256.get(..12).unwrap_or(&c.sha256),
            c.loaded_at
        ),
        None => "config unknown".to_string(),
    };
    format!(
        "{agent}; {config}; {}",
        layout_words(a.map_layout_version, a.expected_map_layout_version)
    )
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The report as a terminal table.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let a = &r.agent;
    let state = if a.running {
        format!("running (pid {}, up {}s)", a.pid, a.uptime_seconds)
    } else {
        format!(
            "NOT ANSWERING on {} (maps below may be stale: {})",
            a.control_socket,
            a.control_error.as_deref().unwrap_or("?")
        )
    };
    let _ = writeln!(o, "agent:     {state}");
    let _ = writeln!(o, "version:   {}", identity_line(r));
    if a.ifindex == 0 {
        let _ = writeln!(
            o,
            "data plane: no XDP (every VIP is in socket mode), maps pinned under {}",
            a.pin_path
        );
    } else {
        let _ = writeln!(
            o,
            "data plane: XDP {} on {} (ifindex {}), maps pinned under {}",
            a.xdp_mode, a.interface, a.ifindex, a.pin_path
        );
    }
    if a.socket_hooks {
        let _ = writeln!(o, "socket hooks: connect4 and getpeername4 attached");
    }
    let t = &r.flow_table;
    let _ = writeln!(
        o,
        "flow table: {} connections (of {}), {} half-open (of {}), {} DSR (of {}); {:.1} MiB, all maps {:.1} MiB",
        r.flows,
        t.capacity,
        r.half_open,
        t.half_open_capacity,
        r.dsr_flows,
        t.dsr_capacity,
        t.bytes as f64 / 1048576.0,
        t.all_maps_bytes as f64 / 1048576.0
    );
    if a.running {
        let _ = writeln!(
            o,
            "maps:      {}{} repairs, {} failed writes{}",
            if a.maps_behind {
                "BEHIND THE AGENT (a write is being retried); "
            } else {
                "as the agent intends; "
            },
            a.map_repairs,
            a.map_write_failures,
            a.last_map_repair
                .as_deref()
                .map(|l| format!(" (last repair: {l})"))
                .unwrap_or_default()
        );
    }
    if let Some(v) = &r.vrrp {
        let _ = writeln!(
            o,
            "vrrp:      {} (v{} VRID {}, priority {} of base {}, master {}, adverts every {} ms)",
            v.state.to_uppercase(),
            v.version,
            v.virtual_router_id,
            v.effective_priority,
            v.base_priority,
            v.master.as_deref().unwrap_or("unknown"),
            v.advert_interval_ms
        );
        let bad: Vec<String> = v
            .bad_packets
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "           addresses {}; adverts sent {}, received {}; bad packets: {}; last transition {}",
            v.addresses.join(", "),
            v.adverts_sent,
            v.adverts_received,
            if bad.is_empty() { "none".to_string() } else { bad.join(", ") },
            v.last_transition.as_deref().unwrap_or("none")
        );
        if let Some(f) = &v.fault_reason {
            let _ = writeln!(o, "           FAULT: {f}");
        }
    }
    for v in &r.vips {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "VIP {}  {}:{}/{}  mode {}  {}  maglev {}{}  probes {}",
            v.name,
            v.address,
            v.port,
            v.protocol,
            v.mode,
            match (&v.ipip_source, v.snat_address.is_empty()) {
                (Some(net), _) => format!("outer source {net}"),
                (None, true) => "direct return".to_string(),
                (None, false) => format!("snat {}:{}", v.snat_address, v.snat_ports),
            },
            v.maglev_table_size,
            v.mss_clamp
                .map(|m| format!("  mss clamp {m}"))
                .unwrap_or_default(),
            v.probe.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            o,
            "  flows {}  new flows {}  to backends {} pkts / {}  replies {} pkts / {}",
            v.flows,
            v.new_flows,
            v.packets,
            human_bytes(v.bytes),
            v.reply_packets,
            human_bytes(v.reply_bytes)
        );
        if let Some(p) = &v.health_panic {
            let _ = writeln!(o, "  PANIC MODE: {p}");
        }
        if let Some(d) = &v.discovery {
            let _ = writeln!(o, "  backends: {}", d.line());
        }
        let _ = writeln!(
            o,
            "  {:<16} {:<21} {:<6} {:>6} {:>6} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "BACKEND",
            "ADDRESS",
            "STATE",
            "WEIGHT",
            "SLOTS",
            "FLOWS",
            "NEW FLOWS",
            "PACKETS",
            "BYTES",
            "REPLY PKTS",
            "REPLY BYTES"
        );
        for b in &v.backends {
            let _ = write!(
                o,
                "  {:<16} {:<21} {:<6} {:>6} {:>6} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10}",
                if b.local {
                    format!("{} (local)", b.name)
                } else {
                    b.name.clone()
                },
                format!("{}:{}", b.address, b.port),
                b.state,
                b.weight,
                b.slots,
                b.flows,
                b.new_flows,
                b.packets,
                human_bytes(b.bytes),
                b.reply_packets,
                human_bytes(b.reply_bytes)
            );
            let _ = writeln!(o);
            if let Some(h) = &b.health {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut line = format!(
                    "    health {}{}: last probe {}",
                    h.health,
                    if h.drained { " (drained)" } else { "" },
                    match (&h.last_result, h.last_latency_ms) {
                        (Some(r), Some(ms)) => format!("{r} in {ms} ms"),
                        _ => "none yet".into(),
                    }
                );
                line += &format!(
                    ", {} ok / {} failed in a row",
                    h.consecutive_successes, h.consecutive_failures
                );
                if let Some(r) = &h.down_reason {
                    line += &format!(", down: {r}");
                }
                if h.served_in_panic {
                    line += ", SERVED IN PANIC MODE";
                }
                if let Some(f) = &h.last_failure {
                    line += &format!(", last failure: {f}");
                }
                if let Some(t) = h.last_change_unix {
                    line += &format!(", changed {}s ago", now.saturating_sub(t));
                }
                let _ = writeln!(o, "{line}");
            }
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "counters (packets, all CPUs):");
    for (k, v) in &r.counters {
        if *v > 0 {
            let _ = writeln!(o, "  {k:<22} {v}");
        }
    }
    if r.counters.values().all(|v| *v == 0) {
        let _ = writeln!(o, "  (all zero)");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(running: bool, pinned_layout: u32) -> Report {
        Report {
            agent: AgentStatus {
                running,
                pid: 4242,
                version: if running {
                    "0.1.0".into()
                } else {
                    String::new()
                },
                map_layout_version: pinned_layout,
                expected_map_layout_version: MAP_LAYOUT_VERSION,
                control_error: (!running).then(|| "connection refused".into()),
                ..Default::default()
            },
            config: running.then(|| ConfigStatus {
                path: "/etc/lb/lb.toml".into(),
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
                loaded_at: rfc3339(1_795_000_000),
            }),
            ..Default::default()
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
    }

    #[test]
    fn rfc3339_is_utc_to_the_second() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn version_line_names_agent_config_and_layout() {
        let text = render(&report(true, MAP_LAYOUT_VERSION));
        assert_eq!(
            line(&text, "version:"),
            format!(
                "version:   lb-agent 0.1.0; config /etc/lb/lb.toml (sha256 ba7816bf8f01, loaded 2026-11-18T11:06:40Z); map layout {MAP_LAYOUT_VERSION}"
            )
        );
        // Near the top: right after the agent's own line.
        assert!(
            text.lines().nth(1).unwrap().starts_with("version:"),
            "{text}"
        );
    }

    #[test]
    fn a_layout_this_binary_does_not_expect_is_said_plainly() {
        let text = render(&report(true, MAP_LAYOUT_VERSION + 1));
        assert!(
            line(&text, "version:").ends_with(&format!(
                "; map layout {} (this lb-agent expects {MAP_LAYOUT_VERSION})",
                MAP_LAYOUT_VERSION + 1
            )),
            "{text}"
        );
        let text = render(&report(true, 0));
        assert!(
            line(&text, "version:").ends_with(&format!(
                "; map layout 0 (pinned before layouts were versioned; this lb-agent expects {MAP_LAYOUT_VERSION})"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_wedged_agent_still_shows_the_pinned_layout() {
        let text = render(&report(false, MAP_LAYOUT_VERSION));
        assert_eq!(
            line(&text, "version:"),
            format!(
                "version:   lb-agent unknown (not answering); config unknown; map layout {MAP_LAYOUT_VERSION}"
            )
        );
    }

    #[test]
    fn a_discovering_vip_says_where_its_backends_come_from() {
        let mut r = report(true, MAP_LAYOUT_VERSION);
        r.vips.push(VipStatus {
            name: "kube-apiserver".into(),
            discovery: Some(DiscoveryStatus {
                vip: "kube-apiserver".into(),
                source: "endpointslice".into(),
                resource_version: Some("42".into()),
                updated_unix: Some(1_795_000_000),
                listed: vec!["192.0.2.11:6443".into()],
                state: "watching via 192.0.2.11:6443".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        r.vips.push(VipStatus {
            name: "plain".into(),
            ..Default::default()
        });
        let text = render(&r);
        assert_eq!(
            line(&text, "  backends:"),
            "  backends: discovered from the kubernetes EndpointSlice (rv 42, at 2026-11-18T11:06:40Z); watching via 192.0.2.11:6443"
        );
        assert_eq!(text.matches("  backends:").count(), 1, "{text}");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["vips"][0]["discovery"]["source"], "endpointslice");
        assert_eq!(v["vips"][0]["discovery"]["resource_version"], "42");
        assert!(v["vips"][1].get("discovery").is_none(), "{v}");
    }

    #[test]
    fn json_names_the_identity_fields() {
        let v = serde_json::to_value(report(true, MAP_LAYOUT_VERSION)).unwrap();
        assert_eq!(v["agent"]["version"], "0.1.0");
        assert_eq!(v["agent"]["map_layout_version"], MAP_LAYOUT_VERSION);
        assert_eq!(
            v["agent"]["expected_map_layout_version"],
            MAP_LAYOUT_VERSION
        );
        assert_eq!(v["config"]["path"], "/etc/lb/lb.toml");
        assert_eq!(
            v["config"]["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(v["config"]["loaded_at"], "2026-11-18T11:06:40Z");
        let v = serde_json::to_value(report(false, MAP_LAYOUT_VERSION)).unwrap();
        assert!(v.get("config").is_none(), "unknown without the agent: {v}");
        assert_eq!(v["agent"]["map_layout_version"], MAP_LAYOUT_VERSION);
    }
}
