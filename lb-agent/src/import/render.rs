//! The lb.toml text: tables of fields, each with a comment naming where it came from, and
//! a header listing what lb does differently. Written as text (not serialized from the
//! config types) because it is for people; the tests parse it back with the config loader.

use std::fmt::Write as _;
use std::time::Duration;

use super::haproxy::Service;
use super::keepalived::Vrrp;
use super::script::Track;
use super::{AddressFrom, Inputs, Note, Vip};

/// `key = value  # comment`, or the same commented out.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub key: String,
    /// A TOML value, as written.
    pub value: String,
    pub comment: Option<String>,
    pub commented: bool,
}

impl Field {
    pub(crate) fn new(key: &str, value: String, comment: Option<String>) -> Field {
        Field {
            key: key.into(),
            value,
            comment,
            commented: false,
        }
    }

    pub(crate) fn commented(key: &str, value: String, comment: Option<String>) -> Field {
        Field {
            commented: true,
            ..Field::new(key, value, comment)
        }
    }
}

/// A TOML string.
pub(crate) fn s(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

/// A TOML integer.
pub(crate) fn int(n: i64) -> String {
    n.to_string()
}

/// A duration as lb's config writes it ("2s", "100ms"), as a TOML string.
pub(crate) fn dur(ms: u64) -> String {
    s(&human_ms(ms))
}

/// "2s", "100ms", "3h", "1s 500ms".
pub(crate) fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) && ms < 3_600_000 {
        format!("{}s", ms / 1000)
    } else {
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }
}

fn array(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

/// Where agent.interface comes from.
pub(crate) enum Origin {
    Flag(String),
    Line(String, usize),
}

/// Everything the text is made of.
pub(crate) struct Plan<'a> {
    pub inputs: &'a Inputs,
    pub interface: Origin,
    pub services: &'a [Service],
    pub vips: &'a [Vip],
    pub vrrp: Option<&'a Vrrp>,
    pub track: Option<&'a Track>,
}

/// Column the comments of fields start at.
const COMMENT_AT: usize = 34;
/// Comment lines are wrapped before this column.
const WIDTH: usize = 92;

#[derive(Default)]
struct Out {
    s: String,
}

impl Out {
    fn blank(&mut self) {
        self.s.push('\n');
    }

    /// `text` as comment lines, wrapped; `hang` indents the lines after the first.
    fn comment(&mut self, indent: &str, text: &str, hang: &str) {
        let mut line = format!("{indent}#");
        for word in text.split_whitespace() {
            if line.len() + 1 + word.len() > WIDTH && line.len() > indent.len() + 2 + hang.len() {
                self.s.push_str(&line);
                self.s.push('\n');
                line = format!("{indent}#{hang}");
            }
            line.push(' ');
            line.push_str(word);
        }
        self.s.push_str(&line);
        self.s.push('\n');
    }

    fn table(&mut self, indent: &str, header: &str, commented: bool) {
        let _ = writeln!(
            self.s,
            "{indent}{}{header}",
            if commented { "# " } else { "" }
        );
    }

    fn field(&mut self, indent: &str, f: &Field) {
        let mut line = format!(
            "{indent}{}{} = {}",
            if f.commented { "# " } else { "" },
            f.key,
            f.value
        );
        if let Some(c) = &f.comment {
            let pad = COMMENT_AT.saturating_sub(line.len()).max(2);
            line.push_str(&" ".repeat(pad));
            line.push_str("# ");
            line.push_str(c);
        }
        self.s.push_str(&line);
        self.s.push('\n');
    }
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The lb.toml.
pub(crate) fn render(plan: &Plan<'_>, notes: &[Note]) -> String {
    let mut o = Out::default();
    let i = plan.inputs;
    let ha = i.haproxy.as_ref().map(|s| file_name(&s.path));
    let ka = i.keepalived.as_ref().map(|s| file_name(&s.path));
    o.comment(
        "",
        &format!(
            "lb.toml written by `lb-agent import` (lb-agent {}) from:",
            crate::VERSION
        ),
        "",
    );
    for (what, src) in [
        ("haproxy:     ", &i.haproxy),
        ("keepalived:  ", &i.keepalived),
        ("check script:", &i.check_script),
    ] {
        if let Some(src) = src {
            let _ = writeln!(o.s, "#   {what} {}", src.path.display());
        }
    }
    o.comment(
        "",
        "Comments name the line each setting comes from. Check the file on the LB host before \
         use: lb-agent check-config --config FILE",
        "",
    );
    if !notes.is_empty() {
        o.s.push_str(
            "#\n# What lb does differently from the original (each also said on stderr):\n",
        );
        for n in notes {
            o.comment("", &format!("- {n}"), "   ");
        }
    }

    o.blank();
    o.table("", "[agent]", false);
    o.field(
        "",
        &match &plan.interface {
            Origin::Flag(name) => Field::new("interface", s(name), Some("--interface".into())),
            Origin::Line(name, line) => Field::new(
                "interface",
                s(name),
                Some(format!(
                    "{}:{line} (keepalived's interface); XDP attaches here",
                    ka.as_deref().unwrap_or("")
                )),
            ),
        },
    );

    let ha = ha.unwrap_or_default();
    for vip in plan.vips {
        let svc = &plan.services[vip.service];
        o.blank();
        o.table("", "[[vip]]", false);
        let origin = match &svc.backend {
            Some((b, bl)) => format!("{ha}:{} {} -> {b} (line {bl})", svc.origin.1, svc.origin.0),
            None => format!("{ha}:{} {}", svc.origin.1, svc.origin.0),
        };
        o.field("", &Field::new("name", s(&vip.name), Some(origin)));
        let from = match vip.address.1 {
            AddressFrom::Bind(l) => format!("{ha}:{l} bind"),
            AddressFrom::Keepalived(l) => {
                format!("{}:{l} virtual_ipaddress", ka.as_deref().unwrap_or(""))
            }
        };
        o.field(
            "",
            &Field::new("address", s(&vip.address.0.to_string()), Some(from)),
        );
        o.field(
            "",
            &Field::new(
                "port",
                int(i64::from(vip.port.0)),
                Some(format!("{ha}:{} bind", vip.port.1)),
            ),
        );
        let other_port = svc
            .servers
            .iter()
            .filter_map(|b| b.port)
            .find(|&p| p != vip.port.0);
        if let Some(p) = other_port {
            o.comment(
                "",
                &format!(
                    "HAProxy listened on {} and the apiservers on {p}: where HAProxy runs on the \
                     apiserver hosts the two cannot share a port. lb takes no port of its own, so \
                     port = {p} would work as well (docs/colocated.md); {} is kept, as the \
                     clients use it.",
                    vip.port.0, vip.port.0
                ),
                "",
            );
        }
        o.blank();
        o.table("  ", "[vip.health]", false);
        for c in &svc.health_before {
            o.comment("  ", c, "");
        }
        for f in &svc.health {
            o.field("  ", f);
        }
        for b in &svc.servers {
            o.blank();
            if b.backup {
                o.comment(
                    "  ",
                    "A backup server in HAProxy: lb has none (as a backend it would always get its share).",
                    "",
                );
            }
            o.table("  ", "[[vip.backend]]", b.backup);
            let field = |k: &str, v: String, c: Option<String>| {
                if b.backup {
                    Field::commented(k, v, c)
                } else {
                    Field::new(k, v, c)
                }
            };
            o.field(
                "  ",
                &field("name", s(&b.name), Some(format!("{ha}:{} server", b.line))),
            );
            o.field("  ", &field("address", s(&b.address.to_string()), None));
            match b.port {
                Some(p) => o.field("  ", &field("port", int(i64::from(p)), None)),
                None => o.comment(
                    "  ",
                    "no port on the server line: HAProxy used the port the client connected to, lb uses the VIP's",
                    "",
                ),
            }
            if b.disabled {
                o.field(
                    "  ",
                    &field(
                        "weight",
                        "0".into(),
                        Some("disabled: drained, no new connections".into()),
                    ),
                );
            } else if let Some(w) = b.weight {
                o.field(
                    "  ",
                    &field(
                        "weight",
                        int(i64::from(w)),
                        Some("HAProxy's weight (relative)".into()),
                    ),
                );
            }
        }
    }
    if plan.inputs.haproxy.is_none() {
        if let Some(v) = plan.vrrp {
            o.blank();
            o.comment(
                "",
                "FILL IN: no haproxy config was given, so nothing says the port clients use or \
                 the apiservers. One [[vip]] per address and port, as in this sketch:",
                "",
            );
            o.table("", "[[vip]]", true);
            o.field("", &Field::commented("name", s("kube-apiserver"), None));
            o.field(
                "",
                &Field::commented("address", s(&v.addresses[0].address.to_string()), None),
            );
            o.field("", &Field::commented("port", "6443".into(), None));
            o.table("  ", "[[vip.backend]]", true);
            o.field("  ", &Field::commented("name", s("master01"), None));
            o.field("  ", &Field::commented("address", s("198.18.0.11"), None));
        }
    }

    if let Some(v) = plan.vrrp {
        vrrp(&mut o, v, plan.track, ka.as_deref().unwrap_or(""));
    } else {
        o.blank();
        o.comment(
            "",
            "No keepalived config was given: no [vrrp]. The VIP's address must reach this host by \
             other means (lb moves it between LB hosts only with a [vrrp] section).",
            "",
        );
    }
    o.s
}

fn vrrp(o: &mut Out, v: &Vrrp, track: Option<&Track>, ka: &str) {
    let at = |l: usize, what: &str| Some(format!("{ka}:{l} {what}"));
    o.blank();
    o.table("", "[vrrp]", false);
    let mut name = format!("{ka}:{} vrrp_instance {}", v.name.1, v.name.0);
    for (m, l) in &v.merged {
        let _ = write!(name, " + {m} (line {l})");
    }
    o.field("", &Field::new("name", s(&v.name.0), Some(name)));
    o.comment("", "interface: agent.interface", "");
    o.field(
        "",
        &Field::new(
            "virtual_router_id",
            int(i64::from(v.vrid.0)),
            at(v.vrid.1, "virtual_router_id"),
        ),
    );
    let raise = track.map_or(0, |t| t.raise);
    let (base, pc) = match &v.priority {
        Some((p, l)) => (*p, format!("{ka}:{l} priority {p}")),
        None => (100, "keepalived's default".to_string()),
    };
    let priority = if base == 255 || raise == 0 {
        base
    } else {
        base.saturating_add(raise).min(254)
    };
    let mut pc = pc;
    if priority != base {
        let _ = write!(pc, " + {raise} (the tracking scripts' positive weights)");
    }
    if let Some((st, l)) = &v.state {
        let _ = write!(pc, "; state {st} (line {l}): the priorities decide");
    }
    o.field(
        "",
        &Field::new("priority", int(i64::from(priority)), Some(pc)),
    );
    let version = v.version();
    o.field(
        "",
        &Field::new(
            "version",
            int(i64::from(version)),
            Some(match &v.version {
                Some((_, l)) => format!("{ka}:{l} vrrp_version"),
                None => "keepalived's default; lb's is 3".into(),
            }),
        ),
    );
    let advert = v.advert_ms.as_ref().map_or(1000, |a| a.0);
    o.field(
        "",
        &Field::new(
            "advert_interval",
            dur(advert),
            Some(match &v.advert_ms {
                Some((_, l)) => format!("{ka}:{l} advert_int"),
                None => "keepalived's default advert_int".into(),
            }),
        ),
    );
    if advert >= 1000 {
        o.comment(
            "",
            "lb's default is VRRPv3 at 100ms: a dead master then costs about 0.4s instead of \
             about 3.6s. Keep the peers' settings while keepalived hosts share the router.",
            "",
        );
    }
    if let Some(l) = v.nopreempt {
        o.field(
            "",
            &Field::new("preempt", "false".into(), at(l, "nopreempt")),
        );
    }
    if let Some((ms, l)) = &v.preempt_delay_ms {
        o.field(
            "",
            &Field::new("preempt_delay", dur(*ms), at(*l, "preempt_delay")),
        );
    }
    if let Some((p, l)) = &v.auth_pass {
        if version == 2 {
            o.field("", &Field::new("auth_pass", s(p), at(*l, "auth_pass")));
        }
    }
    let addrs: Vec<String> = v
        .addresses
        .iter()
        .map(|a| s(&format!("{}/{}", a.address, a.prefix)))
        .collect();
    let lines: Vec<String> = v.addresses.iter().map(|a| a.line.to_string()).collect();
    o.field(
        "",
        &Field::new(
            "virtual_addresses",
            array(&addrs),
            Some(format!("{ka}:{} virtual_ipaddress", lines.join(","))),
        ),
    );
    if let Some((a, l)) = &v.unicast_src {
        o.field(
            "",
            &Field::new("unicast_src", s(&a.to_string()), at(*l, "unicast_src_ip")),
        );
    }
    if !v.peers.is_empty() {
        let peers: Vec<String> = v.peers.iter().map(|p| s(&p.0.to_string())).collect();
        o.field(
            "",
            &Field::new(
                "unicast_peers",
                array(&peers),
                at(v.peers[0].1, "unicast_peer"),
            ),
        );
    }
    if let Some((n, l)) = &v.garp.master_repeat {
        o.field(
            "",
            &Field::new(
                "garp_count",
                int(i64::from(*n)),
                at(*l, "garp_master_repeat"),
            ),
        );
    }
    if let Some((n, l)) = &v.garp.lower_prio_repeat {
        o.field(
            "",
            &Field::new(
                "garp_lower_prio_repeat",
                int(i64::from(*n)),
                at(*l, "garp_lower_prio_repeat"),
            ),
        );
    }
    if let Some((n, l)) = &v.garp.master_refresh_s {
        if *n > 0 {
            o.field(
                "",
                &Field::new("garp_refresh", dur(n * 1000), at(*l, "garp_master_refresh")),
            );
        }
    }
    for (key, val) in [
        ("notify", &v.notify.any),
        ("notify_master", &v.notify.master),
        ("notify_backup", &v.notify.backup),
        ("notify_fault", &v.notify.fault),
    ] {
        if let Some((cmd, l)) = val {
            o.field("", &Field::new(key, s(cmd), at(*l, key)));
        }
    }
    if let Some((n, l)) = &v.rt_priority {
        o.field(
            "",
            &Field::new(
                "rt_priority",
                int(i64::from(*n)),
                at(*l, "vrrp_rt_priority"),
            ),
        );
    }
    o.blank();
    o.table("", "[vrrp.track]", false);
    o.comment(
        "",
        "How much the priority drops while something is wrong. lb runs no tracking scripts: \
         its own probes and data plane stand in for them.",
        "",
    );
    let d = crate::config::TrackConfig::default();
    let t = track.cloned().unwrap_or_default();
    for (key, val, def) in [
        (
            "no_healthy_backend",
            &t.no_healthy_backend,
            d.no_healthy_backend,
        ),
        ("dataplane_down", &t.dataplane_down, d.dataplane_down),
        (
            "local_backend_down",
            &t.local_backend_down,
            d.local_backend_down,
        ),
    ] {
        let f = match val {
            Some((n, c)) => Field::new(key, int(i64::from(*n)), Some(c.clone())),
            None => Field::new(key, int(i64::from(def)), Some("lb's own default".into())),
        };
        o.field("", &f);
    }
}
