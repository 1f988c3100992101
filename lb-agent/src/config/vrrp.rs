//! The `[vrrp]` section: which router this LB is, how it advertises, what it runs on a
//! transition, and how tracking lowers its priority.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Deserialize;

use super::{issue, validate_ifname, validate_ipv4, AgentConfig, Issue, VipConfig};

/// Default SCHED_RR priority of the VRRP thread: none, as keepalived (see
/// docs/architecture.md, "VRRP timing": the normal scheduler kept 50 ms adverts on time with
/// every CPU saturated; a real-time priority is for hosts whose load runs at a higher one).
pub const DEFAULT_RT_PRIORITY: u8 = 0;
/// Default VRRPv3 advertisement interval.
pub const DEFAULT_ADVERT_INTERVAL_V3: Duration = Duration::from_millis(100);

/// The `[vrrp]` section: the agent runs VRRP for the virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpConfig {
    /// Interface adverts go out of and addresses go on.
    pub interface: String,
    pub virtual_router_id: u8,
    /// Base priority, 1..=255 (255 = address owner).
    pub priority: u8,
    /// 2 (RFC 3768) or 3 (RFC 5798).
    pub version: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// v2 simple password (keepalived's auth_type PASS).
    pub auth_pass: Option<String>,
    pub unicast_src: Option<Ipv4Addr>,
    /// Empty: multicast to 224.0.0.18.
    pub unicast_peers: Vec<Ipv4Addr>,
    /// Addresses (with prefix length) held by the master.
    pub virtual_addresses: Vec<(Ipv4Addr, u8)>,
    /// Gratuitous ARPs sent on becoming master (and again a few seconds later).
    pub garp_count: u32,
    /// Gratuitous ARPs sent when, as master, we hear a lower priority (keepalived's
    /// garp_lower_prio_repeat): another router thought it was master and announced itself.
    pub garp_lower_prio_repeat: u32,
    /// While master, announce the addresses again this often (keepalived's
    /// garp_master_refresh); None = never.
    pub garp_refresh: Option<Duration>,
    /// The instance's name, as keepalived passes it to notify scripts (`INSTANCE <name>`).
    pub name: String,
    /// Scripts run on transitions, as keepalived runs them.
    pub notify: NotifyConfig,
    pub track: TrackConfig,
    /// SCHED_RR priority of the VRRP thread (1-99), so adverts leave on time on a busy
    /// host; 0 = the normal scheduler.
    pub rt_priority: u8,
}

/// keepalived's notify scripts; each is a command line split like a shell would (no shell
/// runs it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Run on every transition with `INSTANCE <name> <STATE> <priority>` appended.
    pub any: Option<Vec<String>>,
    /// Run on becoming master, as configured (no arguments appended).
    pub master: Option<Vec<String>>,
    /// Run on becoming backup.
    pub backup: Option<Vec<String>>,
    /// Run on entering the fault state.
    pub fault: Option<Vec<String>>,
}

impl NotifyConfig {
    /// True when no script is configured.
    pub fn is_empty(&self) -> bool {
        self.any.is_none() && self.master.is_none() && self.backup.is_none() && self.fault.is_none()
    }
}

/// `[vrrp.track]`: how much the priority drops while something is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackConfig {
    /// While a VIP has no healthy backend.
    pub no_healthy_backend: u8,
    /// While the XDP program is not attached.
    pub dataplane_down: u8,
    /// While a backend at an address of this host (lb on a control-plane node) is down or
    /// not ready: the VIP then moves to a node whose apiserver works. 0 (the default): no
    /// effect, the node forwards to the other apiservers.
    pub local_backend_down: u8,
}

impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            no_healthy_backend: 50,
            dataplane_down: 100,
            local_backend_down: 0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [vrrp] table")]
pub(super) struct RawVrrp {
    interface: Option<String>,
    virtual_router_id: Option<i64>,
    priority: Option<i64>,
    version: Option<i64>,
    advert_interval: Option<String>,
    preempt: Option<bool>,
    preempt_delay: Option<String>,
    auth_pass: Option<String>,
    unicast_src: Option<String>,
    #[serde(default)]
    unicast_peers: Vec<String>,
    virtual_addresses: Option<Vec<String>>,
    garp_count: Option<i64>,
    garp_lower_prio_repeat: Option<i64>,
    garp_refresh: Option<String>,
    name: Option<String>,
    notify: Option<String>,
    notify_master: Option<String>,
    notify_backup: Option<String>,
    notify_fault: Option<String>,
    rt_priority: Option<i64>,
    track: Option<RawTrack>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [vrrp.track] table")]
struct RawTrack {
    no_healthy_backend: Option<i64>,
    dataplane_down: Option<i64>,
    local_backend_down: Option<i64>,
}

pub(super) fn validate_vrrp(
    raw: RawVrrp,
    agent: &AgentConfig,
    vips: &[VipConfig],
) -> Result<VrrpConfig, Issue> {
    let at = |f: &str| format!("vrrp.{f}");
    // VRRP moves addresses that the XDP program serves: with no XDP there is nothing to move.
    let Some(agent_interface) = &agent.interface else {
        return Err(issue(
            "vrrp",
            "needs agent.interface: every VIP is in socket mode, served on this host alone, with no address to move",
        ));
    };
    let interface = match raw.interface {
        None => agent_interface.clone(),
        Some(i) => validate_ifname(i).map_err(|m| issue(at("interface"), m))?,
    };
    let virtual_router_id = match raw.virtual_router_id {
        None => {
            return Err(issue(
                at("virtual_router_id"),
                "required (1-255, the same on every LB of the pair)",
            ))
        }
        Some(v) if (1..=255).contains(&v) => v as u8,
        Some(v) => {
            return Err(issue(
                at("virtual_router_id"),
                format!("{v} is out of range (1-255)"),
            ))
        }
    };
    let priority = match raw.priority {
        None => 100,
        Some(p) if (1..=255).contains(&p) => p as u8,
        Some(p) => {
            return Err(issue(
                at("priority"),
                format!("{p} is out of range (1-254; 255 = the address owner)"),
            ))
        }
    };
    let version = match raw.version {
        None => 3,
        Some(v @ (2 | 3)) => v as u8,
        Some(v) => {
            return Err(issue(
                at("version"),
                format!("{v} is not a VRRP version (2 or 3)"),
            ))
        }
    };
    let advert_interval = match raw.advert_interval {
        // VRRPv3: measured safe with every CPU saturated (docs/architecture.md, "VRRP
        // timing"); a dead master costs about 0.4 s. VRRPv2 cannot count below a second.
        None if version == 3 => DEFAULT_ADVERT_INTERVAL_V3,
        None => Duration::from_secs(1),
        Some(s) => {
            let d = humantime::parse_duration(&s).map_err(|e| {
                issue(
                    at("advert_interval"),
                    format!("{s:?} is not a duration like \"100ms\" or \"1s\": {e}"),
                )
            })?;
            let ms = d.as_millis();
            if version == 3 && (!(10..=40_950).contains(&ms) || ms % 10 != 0) {
                return Err(issue(
                    at("advert_interval"),
                    format!("{s:?}: VRRPv3 counts in centiseconds, 10ms to 40.95s"),
                ));
            }
            if version == 2 && (!(1000..=255_000).contains(&ms) || ms % 1000 != 0) {
                return Err(issue(
                    at("advert_interval"),
                    format!("{s:?}: VRRPv2 counts in whole seconds, 1s to 255s (use version = 3 for less)"),
                ));
            }
            d
        }
    };
    let preempt_delay = match raw.preempt_delay {
        None => Duration::ZERO,
        Some(s) => humantime::parse_duration(&s)
            .map_err(|e| issue(at("preempt_delay"), format!("{s:?} is not a duration: {e}")))?,
    };
    if preempt_delay > Duration::from_secs(1000) {
        return Err(issue(at("preempt_delay"), "at most 1000s"));
    }
    let auth_pass = match raw.auth_pass {
        None => None,
        Some(_) if version == 3 => return Err(issue(
            at("auth_pass"),
            "VRRPv3 has no authentication (RFC 5798 removed it); use version = 2 or drop auth_pass",
        )),
        Some(p) if p.is_empty() || p.len() > 8 || !p.is_ascii() => {
            return Err(issue(
                at("auth_pass"),
                "1 to 8 ASCII characters (keepalived would silently truncate a longer one)",
            ))
        }
        Some(p) => Some(p),
    };
    let unicast_src = match raw.unicast_src.as_deref() {
        None => None,
        Some(s) => Some(validate_ipv4(&at("unicast_src"), Some(s))?),
    };
    let mut unicast_peers = Vec::new();
    for (i, p) in raw.unicast_peers.iter().enumerate() {
        unicast_peers.push(validate_ipv4(&format!("vrrp.unicast_peers[{i}]"), Some(p))?);
    }
    let virtual_addresses = match raw.virtual_addresses {
        // A socket-mode VIP is where this host's own processes connect: nothing to move.
        None => vips
            .iter()
            .filter(|v| v.mode != super::Mode::Socket)
            .map(|v| (v.address, 32))
            .collect(),
        Some(list) if list.is_empty() => {
            return Err(issue(
                at("virtual_addresses"),
                "must name at least one address",
            ))
        }
        Some(list) => {
            let mut out = Vec::new();
            for (i, a) in list.iter().enumerate() {
                let field = format!("vrrp.virtual_addresses[{i}]");
                let (ip, prefix) = match a.split_once('/') {
                    None => (a.as_str(), 32),
                    Some((ip, p)) => match p.parse::<u8>() {
                        Ok(p) if (1..=32).contains(&p) => (ip, p),
                        _ => {
                            return Err(issue(field, format!("{a:?}: prefix length must be 1-32")))
                        }
                    },
                };
                let ip = validate_ipv4(&field, Some(ip))?;
                if let Some(v) = vips
                    .iter()
                    .find(|v| v.mode == super::Mode::Socket && v.address == ip)
                {
                    return Err(issue(
                        field,
                        format!(
                            "{ip} is socket-mode VIP {:?}'s address: it is this host's own, not one VRRP moves; remove it",
                            v.name
                        ),
                    ));
                }
                out.push((ip, prefix));
            }
            out
        }
    };
    let count = |f: &str, v: Option<i64>, def: u32| -> Result<u32, Issue> {
        match v {
            None => Ok(def),
            Some(n) if (0..=100).contains(&n) => Ok(n as u32),
            Some(n) => Err(issue(at(f), format!("{n} is out of range (0-100)"))),
        }
    };
    let garp_count = count("garp_count", raw.garp_count, 5)?;
    let garp_lower_prio_repeat = count(
        "garp_lower_prio_repeat",
        raw.garp_lower_prio_repeat,
        garp_count,
    )?;
    let garp_refresh = match raw.garp_refresh {
        None => None,
        Some(s) => {
            let d = humantime::parse_duration(&s).map_err(|e| {
                issue(
                    at("garp_refresh"),
                    format!("{s:?} is not a duration like \"60s\": {e}"),
                )
            })?;
            if d.is_zero() {
                None
            } else if d < Duration::from_secs(1) {
                return Err(issue(
                    at("garp_refresh"),
                    format!("{s:?}: at least 1s (or \"0s\" for never)"),
                ));
            } else {
                Some(d)
            }
        }
    };
    let name = match raw.name {
        None => "VI_1".to_string(),
        Some(n)
            if n.is_empty()
                || n.len() > 64
                || n.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            return Err(issue(
                at("name"),
                format!(
                    "{n:?}: 1 to 64 characters, no spaces (notify scripts get it as one argument)"
                ),
            ))
        }
        Some(n) => n,
    };
    let command = |f: &str, v: Option<String>| -> Result<Option<Vec<String>>, Issue> {
        let Some(line) = v else { return Ok(None) };
        match shlex::split(&line) {
            Some(argv) if !argv.is_empty() => Ok(Some(argv)),
            Some(_) => Err(issue(at(f), "must not be empty")),
            None => Err(issue(
                at(f),
                format!(
                    "{line:?}: unbalanced quotes (the command line is split like a shell would)"
                ),
            )),
        }
    };
    let notify = NotifyConfig {
        any: command("notify", raw.notify)?,
        master: command("notify_master", raw.notify_master)?,
        backup: command("notify_backup", raw.notify_backup)?,
        fault: command("notify_fault", raw.notify_fault)?,
    };
    let rt_priority = match raw.rt_priority {
        None => DEFAULT_RT_PRIORITY,
        Some(n) if (0..=99).contains(&n) => n as u8,
        Some(n) => {
            return Err(issue(
                at("rt_priority"),
                format!("{n} is out of range (1-99 for SCHED_RR, 0 for the normal scheduler)"),
            ))
        }
    };
    let d = TrackConfig::default();
    let weight = |f: &str, v: Option<i64>, def: u8| -> Result<u8, Issue> {
        match v {
            None => Ok(def),
            Some(n) if (0..=254).contains(&n) => Ok(n as u8),
            Some(n) => Err(issue(
                format!("vrrp.track.{f}"),
                format!("{n} is out of range (0-254)"),
            )),
        }
    };
    let track = match raw.track {
        None => d,
        Some(t) => TrackConfig {
            no_healthy_backend: weight(
                "no_healthy_backend",
                t.no_healthy_backend,
                d.no_healthy_backend,
            )?,
            dataplane_down: weight("dataplane_down", t.dataplane_down, d.dataplane_down)?,
            local_backend_down: weight(
                "local_backend_down",
                t.local_backend_down,
                d.local_backend_down,
            )?,
        },
    };
    Ok(VrrpConfig {
        interface,
        virtual_router_id,
        priority,
        version,
        advert_interval,
        preempt: raw.preempt.unwrap_or(true),
        preempt_delay,
        auth_pass,
        unicast_src,
        unicast_peers,
        virtual_addresses,
        garp_count,
        garp_lower_prio_repeat,
        garp_refresh,
        name,
        notify,
        track,
        rt_priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_err, minimal, parse};

    #[test]
    fn vrrp_section() {
        let cfg = parse(&format!(
            "{}\n[vrrp]\nvirtual_router_id = 51\npriority = 110\nadvert_interval = \"100ms\"\n\
             unicast_src = \"198.18.0.2\"\nunicast_peers = [\"198.18.0.3\"]\n\
             virtual_addresses = [\"198.18.0.100/24\"]\npreempt = false\npreempt_delay = \"2s\"\n\
             garp_count = 3\nnotify = \"/usr/local/bin/lb-notify --all\"\n\
             notify_master = \"'/opt/my scripts/master.sh'\"\ngarp_refresh = \"60s\"\nname = \"VI_API\"\n[vrrp.track]\nno_healthy_backend = 60\nlocal_backend_down = 80\n",
            minimal("", "")
        ))
        .unwrap();
        let v = cfg.vrrp.unwrap();
        assert_eq!(v.interface, "eth0", "defaults to agent.interface");
        assert_eq!((v.virtual_router_id, v.priority, v.version), (51, 110, 3));
        assert_eq!(v.advert_interval, Duration::from_millis(100));
        assert!(!v.preempt);
        assert_eq!(v.preempt_delay, Duration::from_secs(2));
        assert_eq!(v.unicast_peers, vec![Ipv4Addr::new(198, 18, 0, 3)]);
        assert_eq!(
            v.virtual_addresses,
            vec![(Ipv4Addr::new(198, 18, 0, 100), 24)]
        );
        assert_eq!(v.track.no_healthy_backend, 60);
        assert_eq!(v.track.local_backend_down, 80);
        assert_eq!(
            v.notify.any,
            Some(vec![
                "/usr/local/bin/lb-notify".to_string(),
                "--all".to_string()
            ])
        );
        assert_eq!(
            v.notify.master,
            Some(vec!["/opt/my scripts/master.sh".to_string()])
        );
        assert_eq!(v.notify.backup, None);
        assert_eq!(v.garp_refresh, Some(Duration::from_secs(60)));
        assert_eq!((v.garp_count, v.garp_lower_prio_repeat), (3, 3));
        assert_eq!(v.name, "VI_API");
        assert_eq!(v.track.dataplane_down, 100);
        // Defaults: every VIP address as /32, v3, 1s, preempt.
        let v = parse(&format!(
            "{}\n[vrrp]\nvirtual_router_id = 7\n",
            minimal("", "")
        ))
        .unwrap()
        .vrrp
        .unwrap();
        assert_eq!(
            v.virtual_addresses,
            vec![(Ipv4Addr::new(198, 18, 0, 100), 32)]
        );
        assert_eq!(
            (v.version, v.priority, v.preempt, v.garp_count),
            (3, 100, true, 5)
        );
        assert_eq!(v.advert_interval, Duration::from_millis(100));
        let v2 = parse(&format!(
            "{}\n[vrrp]\nvirtual_router_id = 7\nversion = 2\n",
            minimal("", "")
        ))
        .unwrap()
        .vrrp
        .unwrap();
        assert_eq!(
            v2.advert_interval,
            Duration::from_secs(1),
            "v2 counts in seconds"
        );
    }

    #[test]
    fn vrrp_errors() {
        let v = |body: &str| format!("{}\n[vrrp]\n{body}\n", minimal("", ""));
        assert_err(&v("priority = 100"), "vrrp.virtual_router_id", "required");
        assert_err(
            &v("virtual_router_id = 256"),
            "vrrp.virtual_router_id",
            "out of range",
        );
        assert_err(
            &v("virtual_router_id = 1\npriority = 0"),
            "vrrp.priority",
            "out of range",
        );
        assert_err(
            &v("virtual_router_id = 1\nversion = 4"),
            "vrrp.version",
            "not a VRRP version",
        );
        assert_err(
            &v("virtual_router_id = 1\nadvert_interval = \"15ms\""),
            "vrrp.advert_interval",
            "centiseconds",
        );
        assert_err(
            &v("virtual_router_id = 1\nversion = 2\nadvert_interval = \"100ms\""),
            "vrrp.advert_interval",
            "whole seconds",
        );
        assert_err(
            &v("virtual_router_id = 1\nauth_pass = \"x\""),
            "vrrp.auth_pass",
            "VRRPv3 has no authentication",
        );
        assert_err(
            &v("virtual_router_id = 1\nversion = 2\nauth_pass = \"123456789\""),
            "vrrp.auth_pass",
            "1 to 8",
        );
        assert_err(
            &v("virtual_router_id = 1\nunicast_peers = [\"x\"]"),
            "vrrp.unicast_peers[0]",
            "",
        );
        assert_err(
            &v("virtual_router_id = 1\nvirtual_addresses = [\"198.18.0.100/40\"]"),
            "vrrp.virtual_addresses[0]",
            "prefix length",
        );
        assert_err(
            &v("virtual_router_id = 1\nnotify_fault = \"'/bin/x\""),
            "vrrp.notify_fault",
            "unbalanced quotes",
        );
        assert_err(
            &v("virtual_router_id = 1\ngarp_refresh = \"100ms\""),
            "vrrp.garp_refresh",
            "at least 1s",
        );
        assert_err(
            &v("virtual_router_id = 1\nrt_priority = 100"),
            "vrrp.rt_priority",
            "out of range",
        );
        assert_err(
            &v("virtual_router_id = 1\nname = \"VI 1\""),
            "vrrp.name",
            "no spaces",
        );
        assert_err(
            &v("virtual_router_id = 1\n[vrrp.track]\nbogus = 1"),
            "vrrp.track.bogus",
            "unknown field",
        );
    }
}
