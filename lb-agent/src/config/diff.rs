//! What a reload would change: the running config against the new one, as one line per
//! change, or the one field that cannot change in place. Pure, so every rule is unit-tested;
//! the agent applies the difference (`app::reload`).

use std::fmt::Debug;

use super::{Config, ConfigError, HealthConfig, VipConfig, VrrpConfig};

/// Why a field cannot change without restarting the agent, for the refusal's message.
const RESTART: &str = "cannot change in place (the agent keeps its old config); restart the agent to change it (`lb-agent restart`)";

/// The changes from `old` to `new`, in words, or the first field that cannot change in
/// place (named as `check-config` names fields, with `new`'s file).
pub fn diff(old: &Config, new: &Config) -> Result<Vec<String>, ConfigError> {
    let refuse = |field: String, what: String| ConfigError {
        file: new.path.clone(),
        field,
        message: format!("{what}: {RESTART}"),
    };
    let (a, b) = (&old.agent, &new.agent);
    fixed(&refuse, "agent.interface", &a.interface, &b.interface)?;
    fixed(&refuse, "agent.xdp_mode", &a.xdp_mode, &b.xdp_mode)?;
    fixed(&refuse, "agent.pin_path", &a.pin_path, &b.pin_path)?;
    fixed(
        &refuse,
        "agent.control_socket",
        &a.control_socket,
        &b.control_socket,
    )?;
    fixed(
        &refuse,
        "agent.control_socket_group",
        &a.control_socket_group,
        &b.control_socket_group,
    )?;
    fixed(&refuse, "agent.max_flows", &a.max_flows, &b.max_flows)?;
    fixed(&refuse, "agent.cgroup", &a.cgroup, &b.cgroup)?;
    fixed(&refuse, "agent.log_format", &a.log_format, &b.log_format)?;
    fixed(
        &refuse,
        "metrics.listen",
        &old.metrics.as_ref().map(|m| m.listen),
        &new.metrics.as_ref().map(|m| m.listen),
    )?;
    // The socket-mode hooks are attached at start, where some VIP needs them.
    let socket = |c: &Config| c.vips.iter().any(|v| v.mode == super::Mode::Socket);
    if socket(new) && !socket(old) {
        return Err(refuse(
            "vip.mode".into(),
            "the first socket-mode VIP (its cgroup hooks are attached at start)".into(),
        ));
    }

    let mut out = Vec::new();
    if a.reconcile_interval != b.reconcile_interval {
        out.push(format!(
            "agent.reconcile_interval: {} -> {}",
            humantime::format_duration(a.reconcile_interval),
            humantime::format_duration(b.reconcile_interval)
        ));
    }
    if a.log_level != b.log_level {
        let show = |l: &Option<String>| {
            l.clone()
                .unwrap_or_else(|| crate::logging::DEFAULT_LEVEL.to_string())
        };
        out.push(format!(
            "agent.log_level: {} -> {}{}",
            show(&a.log_level),
            show(&b.log_level),
            if crate::logging::level_from_env() {
                " (RUST_LOG is set and wins: not applied)"
            } else {
                ""
            }
        ));
    }
    if a.removed_backends != b.removed_backends {
        out.push(format!(
            "agent.removed_backends: {:?} -> {:?}",
            a.removed_backends, b.removed_backends
        ));
    }

    for (i, v) in new.vips.iter().enumerate() {
        match old.vips.iter().find(|o| o.name == v.name) {
            None => out.push(format!(
                "VIP {} added: {}:{}, {} backends",
                v.name,
                v.address,
                v.port,
                v.backends.len()
            )),
            Some(o) => vip(&refuse, removal(new), i, o, v, &mut out)?,
        }
    }
    for o in &old.vips {
        if !new.vips.iter().any(|v| v.name == o.name) {
            out.push(format!(
                "VIP {} removed ({}:{}): no new connections; {}",
                o.name,
                o.address,
                o.port,
                removal(new)
            ));
        }
    }

    match (&old.vrrp, &new.vrrp) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(refuse(
                "vrrp".into(),
                "the [vrrp] section cannot be added or removed".into(),
            ))
        }
        (Some(o), Some(n)) => vrrp(&refuse, o, n, &mut out)?,
    }
    Ok(out)
}

/// What happens to the connections of removed backends under `new`'s policy.
fn removal(new: &Config) -> &'static str {
    match new.agent.removed_backends {
        super::RemovedBackends::Drain => {
            "its connections are kept until they end (agent.removed_backends = \"drain\")"
        }
        super::RemovedBackends::Reset => {
            "its connections are reset at their next packet (agent.removed_backends = \"reset\")"
        }
    }
}

fn fixed<T: PartialEq + Debug>(
    refuse: &impl Fn(String, String) -> ConfigError,
    field: &str,
    old: &T,
    new: &T,
) -> Result<(), ConfigError> {
    if old == new {
        Ok(())
    } else {
        Err(refuse(field.into(), format!("{old:?} -> {new:?}")))
    }
}

fn vip(
    refuse: &impl Fn(String, String) -> ConfigError,
    removal: &str,
    i: usize,
    o: &VipConfig,
    v: &VipConfig,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let f = |name: &str| format!("vip[{i}].{name}");
    fixed(refuse, &f("address"), &o.address, &v.address)?;
    fixed(refuse, &f("port"), &o.port, &v.port)?;
    fixed(refuse, &f("protocol"), &o.protocol, &v.protocol)?;
    fixed(refuse, &f("mode"), &o.mode, &v.mode)?;
    fixed(
        refuse,
        &f("maglev_table_size"),
        &o.maglev_table_size,
        &v.maglev_table_size,
    )?;
    fixed(refuse, &f("snat_address"), &o.snat_address, &v.snat_address)?;
    fixed(refuse, &f("snat_ports"), &o.snat_ports, &v.snat_ports)?;
    fixed(refuse, &f("ipip_source"), &o.ipip_source, &v.ipip_source)?;
    let name = &v.name;
    if o.mss_clamp != v.mss_clamp {
        let show = |m: Option<u16>| m.map_or("none".to_string(), |m| m.to_string());
        out.push(format!(
            "VIP {name}: mss_clamp {} -> {}",
            show(o.mss_clamp),
            show(v.mss_clamp)
        ));
    }
    if o.discovery != v.discovery {
        let show = |d: &Option<super::DiscoveryConfig>| match d {
            None => "off".to_string(),
            Some(d) => format!("kubernetes (kubeconfig {})", d.kubeconfig.display()),
        };
        out.push(format!(
            "VIP {name}: discovery {} -> {}{}",
            show(&o.discovery),
            show(&v.discovery),
            match (&o.discovery, &v.discovery) {
                (Some(_), None) => ": the configured backends apply again",
                (None, Some(_)) =>
                    ": the configured backends are the seed until an apiserver answers",
                _ => "",
            }
        ));
    }
    let h = health(&o.health, &v.health);
    if !h.is_empty() {
        out.push(format!(
            "VIP {name}: health {} (its probers restart; each backend keeps its state until its next probe)",
            h.join(", ")
        ));
    }
    for b in &v.backends {
        match o.backends.iter().find(|p| p.name == b.name) {
            None => out.push(format!(
                "VIP {name}: backend {} added ({}:{}, weight {}); it takes new connections once a probe passes",
                b.name, b.address, b.port, b.weight
            )),
            Some(p) if (p.address, p.port) != (b.address, b.port) => out.push(format!(
                "VIP {name}: backend {} moved {}:{} -> {}:{}: a new backend under the old name; the old address's connections are handled as a removed backend's",
                b.name, p.address, p.port, b.address, b.port
            )),
            Some(p) if p.weight != b.weight => out.push(format!(
                "VIP {name}: backend {} weight {} -> {}{}",
                b.name,
                p.weight,
                b.weight,
                match (p.weight, b.weight) {
                    (_, 0) => " (drained: its connections are kept, no new ones)",
                    (0, _) => " (takes new connections again)",
                    _ => "",
                }
            )),
            Some(_) => {}
        }
    }
    for p in &o.backends {
        if !v.backends.iter().any(|b| b.name == p.name) {
            out.push(format!(
                "VIP {name}: backend {} removed ({}:{}): no new connections; {removal}",
                p.name, p.address, p.port
            ));
        }
    }
    Ok(())
}

/// The health settings that differ, by name.
fn health(o: &HealthConfig, n: &HealthConfig) -> Vec<String> {
    let mut d = Vec::new();
    let mut cmp = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{name} {a} -> {b}"));
        }
    };
    cmp("kind", format!("{:?}", o.kind), format!("{:?}", n.kind));
    cmp("path", o.path.clone(), n.path.clone());
    cmp(
        "expect_status",
        o.expect_status.to_string(),
        n.expect_status.to_string(),
    );
    let dur = |d| humantime::format_duration(d).to_string();
    cmp("interval", dur(o.interval), dur(n.interval));
    cmp("timeout", dur(o.timeout), dur(n.timeout));
    cmp("rise", o.rise.to_string(), n.rise.to_string());
    cmp("fall", o.fall.to_string(), n.fall.to_string());
    cmp(
        "ca_file",
        o.ca_file.display().to_string(),
        n.ca_file.display().to_string(),
    );
    cmp(
        "insecure_skip_verify",
        o.insecure_skip_verify.to_string(),
        n.insecure_skip_verify.to_string(),
    );
    cmp(
        "server_name",
        format!("{:?}", o.server_name),
        format!("{:?}", n.server_name),
    );
    cmp(
        "client_cert",
        format!("{:?}", o.client_cert),
        format!("{:?}", n.client_cert),
    );
    cmp(
        "client_key",
        format!("{:?}", o.client_key),
        format!("{:?}", n.client_key),
    );
    d
}

fn vrrp(
    refuse: &impl Fn(String, String) -> ConfigError,
    o: &VrrpConfig,
    n: &VrrpConfig,
    out: &mut Vec<String>,
) -> Result<(), ConfigError> {
    fixed(refuse, "vrrp.interface", &o.interface, &n.interface)?;
    fixed(
        refuse,
        "vrrp.virtual_router_id",
        &o.virtual_router_id,
        &n.virtual_router_id,
    )?;
    fixed(refuse, "vrrp.version", &o.version, &n.version)?;
    fixed(
        refuse,
        "vrrp.advert_interval",
        &o.advert_interval,
        &n.advert_interval,
    )?;
    fixed(refuse, "vrrp.preempt", &o.preempt, &n.preempt)?;
    fixed(
        refuse,
        "vrrp.preempt_delay",
        &o.preempt_delay,
        &n.preempt_delay,
    )?;
    fixed(refuse, "vrrp.auth_pass", &o.auth_pass, &n.auth_pass)?;
    fixed(refuse, "vrrp.unicast_src", &o.unicast_src, &n.unicast_src)?;
    fixed(
        refuse,
        "vrrp.unicast_peers",
        &o.unicast_peers,
        &n.unicast_peers,
    )?;
    fixed(
        refuse,
        "vrrp.virtual_addresses",
        &o.virtual_addresses,
        &n.virtual_addresses,
    )?;
    fixed(refuse, "vrrp.name", &o.name, &n.name)?;
    fixed(refuse, "vrrp.rt_priority", &o.rt_priority, &n.rt_priority)?;
    let owner = crate::vrrp::state::PRIORITY_OWNER;
    if o.priority != n.priority {
        if o.priority == owner || n.priority == owner {
            return Err(refuse(
                "vrrp.priority".into(),
                format!(
                    "{} -> {}: becoming or ceasing to be the address owner (255)",
                    o.priority, n.priority
                ),
            ));
        }
        out.push(format!("vrrp.priority: {} -> {}", o.priority, n.priority));
    }
    let mut num = |name: &str, a: u64, b: u64| {
        if a != b {
            out.push(format!("vrrp.{name}: {a} -> {b}"));
        }
    };
    num(
        "track.no_healthy_backend",
        o.track.no_healthy_backend.into(),
        n.track.no_healthy_backend.into(),
    );
    num(
        "track.local_backend_down",
        o.track.local_backend_down.into(),
        n.track.local_backend_down.into(),
    );
    num(
        "track.dataplane_down",
        o.track.dataplane_down.into(),
        n.track.dataplane_down.into(),
    );
    num("garp_count", o.garp_count.into(), n.garp_count.into());
    num(
        "garp_lower_prio_repeat",
        o.garp_lower_prio_repeat.into(),
        n.garp_lower_prio_repeat.into(),
    );
    if o.garp_refresh != n.garp_refresh {
        let show = |d: Option<std::time::Duration>| {
            d.map_or("off".to_string(), |d| {
                humantime::format_duration(d).to_string()
            })
        };
        out.push(format!(
            "vrrp.garp_refresh: {} -> {}",
            show(o.garp_refresh),
            show(n.garp_refresh)
        ));
    }
    if o.notify != n.notify {
        out.push("vrrp.notify: scripts changed (used from the next transition)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = "[agent]\ninterface = \"eth0\"\n\n\
        [[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n\
        [[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n\
        [[vip.backend]]\nname = \"m2\"\naddress = \"198.18.0.12\"\n\n\
        [vrrp]\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = 150\n\
        virtual_addresses = [\"198.18.0.100/24\"]\n";

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("lb.toml"), text).expect("valid config")
    }

    #[test]
    fn the_same_config_changes_nothing() {
        assert_eq!(
            diff(&parse(BASE), &parse(BASE)).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn discovery_may_change_in_place() {
        let on = BASE.replace(
            "port = 6443\n",
            "port = 6443\n[vip.discovery]\nkubernetes = true\n",
        );
        let d = diff(&parse(BASE), &parse(&on)).unwrap();
        assert_eq!(
            d,
            ["VIP api: discovery off -> kubernetes (kubeconfig /etc/kubernetes/kubelet.conf): the configured backends are the seed until an apiserver answers"]
        );
        let d = diff(&parse(&on), &parse(BASE)).unwrap();
        assert_eq!(
            d,
            ["VIP api: discovery kubernetes (kubeconfig /etc/kubernetes/kubelet.conf) -> off: the configured backends apply again"]
        );
    }

    #[test]
    fn backends_added_removed_and_reweighted_are_one_line_each() {
        let new = BASE
            .replace(
                "[[vip.backend]]\nname = \"m2\"\naddress = \"198.18.0.12\"\n",
                "[[vip.backend]]\nname = \"m3\"\naddress = \"198.18.0.13\"\n",
            )
            .replace(
                "name = \"m1\"\naddress = \"198.18.0.11\"\n",
                "name = \"m1\"\naddress = \"198.18.0.11\"\nweight = 0\n",
            );
        let d = diff(&parse(BASE), &parse(&new)).unwrap();
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("VIP api: backend m1 weight 100 -> 0 (drained"));
        assert!(d[1].starts_with("VIP api: backend m3 added (198.18.0.13:6443"));
        assert!(d[2].starts_with("VIP api: backend m2 removed (198.18.0.12:6443)"));
    }

    #[test]
    fn what_cannot_change_in_place_is_refused_naming_the_field() {
        for (from, to, field) in [
            (
                "interface = \"eth0\"\n\n[[vip]]",
                "interface = \"eth1\"\n\n[[vip]]",
                "agent.interface",
            ),
            ("port = 6443\n", "port = 6444\n", "vip[0].port"),
            (
                "port = 6443\n",
                "port = 6443\nmaglev_table_size = 251\n",
                "vip[0].maglev_table_size",
            ),
            (
                "virtual_router_id = 51",
                "virtual_router_id = 52",
                "vrrp.virtual_router_id",
            ),
            ("priority = 150", "priority = 255", "vrrp.priority"),
            (
                "interface = \"eth0\"\n",
                "interface = \"eth0\"\nlog_format = \"json\"\n",
                "agent.log_format",
            ),
        ] {
            let new = BASE.replacen(from, to, 1);
            assert_ne!(new, BASE, "{from}");
            let e = diff(&parse(BASE), &parse(&new)).unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.message.contains("cannot change in place"), "{e}");
            assert_eq!(e.to_string().lines().count(), 1);
        }
    }

    #[test]
    fn the_log_level_changes_in_place() {
        let new = BASE.replacen(
            "interface = \"eth0\"\n",
            "interface = \"eth0\"\nlog_level = \"debug\"\n",
            1,
        );
        let lines = diff(&parse(BASE), &parse(&new)).unwrap();
        assert!(
            lines[0].starts_with("agent.log_level: info -> debug"),
            "{lines:?}"
        );
    }

    #[test]
    fn the_first_socket_mode_vip_needs_a_restart() {
        let new = format!(
            "{BASE}\n[[vip]]\nname = \"local\"\naddress = \"127.0.0.1\"\nport = 6443\nmode = \"socket\"\n\
             [[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n"
        );
        let e = diff(&parse(BASE), &parse(&new)).unwrap_err();
        assert_eq!(e.field, "vip.mode");
        assert!(e.message.contains("restart the agent"), "{e}");
    }

    #[test]
    fn vrrp_priority_and_tracking_change_in_place() {
        let new = format!(
            "{}[vrrp.track]\nno_healthy_backend = 30\n",
            BASE.replace("priority = 150", "priority = 120")
        );
        let d = diff(&parse(BASE), &parse(&new)).unwrap();
        assert_eq!(
            d,
            vec![
                "vrrp.priority: 150 -> 120".to_string(),
                "vrrp.track.no_healthy_backend: 50 -> 30".to_string()
            ]
        );
    }

    #[test]
    fn vips_added_and_removed() {
        let new = BASE.replace("name = \"api\"", "name = \"api2\"");
        let d = diff(&parse(BASE), &parse(&new)).unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("VIP api2 added: 198.18.0.100:6443, 2 backends"));
        assert!(d[1].starts_with("VIP api removed"));
        assert!(d[1].contains("kept until they end"), "{}", d[1]);
    }
}
