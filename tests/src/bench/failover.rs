//! Failover: two LBs share the VIP by VRRP in front of three lb-stub apiservers (HTTPS); one
//! client opens a new TLS connection to the VIP every 20 ms. The master is killed (every
//! process of its namespace SIGKILLed and its link set down: a host that dies) or stopped with
//! SIGTERM (an orderly shutdown); the figure is the client's longest time without a successful
//! answer. Two stacks, each at two advert intervals: lb-agent (its own VRRP, XDP NAT), and
//! keepalived + HAProxy as the kubeadm HA guide sets them up. After each case the old master
//! comes back and takes the VIP again (preemption) before the next one.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::{e2e::HAPROXY_GUIDE_DEFAULTS, parse, stats};
use crate::{
    lab::{backend_name, Lab, Proc, VIP, VIP_PORT},
    vrrp_lab::poll_until,
};

/// Priorities of the two LBs: lb's (the backup's matters: its skew time).
const LB_PRIORITIES: [u8; 2] = [110, 100];
/// keepalived's, as in the kubeadm guide.
const KA_PRIORITIES: [u8; 2] = [101, 100];
/// The guide's example password.
const KA_AUTH_PASS: &str = "42";

/// How much to measure.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverOptions {
    /// Runs of every case.
    pub runs: usize,
    /// The client runs this long before the master is stopped (100 ms adverts)...
    pub lead: Duration,
    /// ...and with 1 s adverts.
    pub lead_slow: Duration,
    /// The client goes on this long after the latest the backup should have taken over.
    pub margin: Duration,
    /// Time between the client's requests.
    pub interval: Duration,
    /// The client's budget per request (connect + TLS + response).
    pub timeout: Duration,
}

impl FailoverOptions {
    /// What `cargo xtask bench` measures.
    pub fn full() -> Self {
        Self {
            runs: 3,
            lead: Duration::from_millis(1500),
            lead_slow: Duration::from_secs(2),
            margin: Duration::from_secs(1),
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
        }
    }

    /// `--quick`: one run of every case, a shorter client run.
    pub fn quick() -> Self {
        Self {
            runs: 1,
            lead: Duration::from_secs(1),
            lead_slow: Duration::from_millis(1500),
            margin: Duration::from_millis(600),
            ..Self::full()
        }
    }
}

/// What holds the VIP and forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// lb-agent on both LBs: VRRP in the agent, XDP NAT.
    Lb,
    /// lb-agent on both LBs, the VIP in dsr-l2 mode (the survival cases only).
    #[serde(rename = "lb-dsr-l2")]
    LbDsrL2,
    /// lb-agent on both LBs, the VIP in dsr-ipip mode (the survival cases only).
    #[serde(rename = "lb-dsr-ipip")]
    LbDsrIpip,
    /// keepalived (VRRP) and HAProxy (mode tcp) on both LBs.
    Keepalived,
}

impl Stack {
    /// The VIP's mode when lb-agent runs the stack.
    pub fn lb_mode(self) -> Option<&'static str> {
        match self {
            Stack::Lb => Some("nat"),
            Stack::LbDsrL2 => Some("dsr-l2"),
            Stack::LbDsrIpip => Some("dsr-ipip"),
            Stack::Keepalived => None,
        }
    }

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Stack::Lb => "lb (NAT)",
            Stack::LbDsrL2 => "lb (dsr-l2)",
            Stack::LbDsrIpip => "lb (dsr-ipip)",
            Stack::Keepalived => "keepalived + HAProxy",
        }
    }
}

/// The stacks whose long-lived connections go through a failover.
pub const SURVIVAL_STACKS: [Stack; 4] = [
    Stack::Lb,
    Stack::LbDsrL2,
    Stack::LbDsrIpip,
    Stack::Keepalived,
];

/// Long-lived connections through one failover (the master killed).
#[derive(Clone, Debug, Serialize)]
pub struct Survival {
    pub stack: Stack,
    pub run: usize,
    pub connections: u64,
    /// Connections with no failed request and no reconnect.
    pub survived: u64,
    pub failed_requests: u64,
    pub reconnects: u64,
    /// The longest request of any connection, ms.
    pub max_request_ms: u64,
}

/// A stack at one advert interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub stack: Stack,
    pub vrrp_version: u8,
    pub advert_ms: u64,
}

impl Variant {
    /// Every variant, in the first run's order (the stacks alternate).
    pub const ALL: [Variant; 4] = [
        Variant {
            stack: Stack::Lb,
            vrrp_version: 3,
            advert_ms: 100,
        },
        Variant {
            stack: Stack::Keepalived,
            vrrp_version: 3,
            advert_ms: 100,
        },
        Variant {
            stack: Stack::Lb,
            vrrp_version: 3,
            advert_ms: 1000,
        },
        Variant {
            stack: Stack::Keepalived,
            vrrp_version: 2,
            advert_ms: 1000,
        },
    ];

    /// The path, as the report names it.
    pub fn path_label(self) -> &'static str {
        match self.stack {
            Stack::Lb => "lb (lb-agent VRRP, XDP NAT)",
            Stack::LbDsrL2 => "lb (lb-agent VRRP, XDP dsr-l2)",
            Stack::LbDsrIpip => "lb (lb-agent VRRP, XDP dsr-ipip)",
            Stack::Keepalived => "keepalived + HAProxy (kubeadm guide)",
        }
    }

    /// The advert interval as each stack's config says it.
    pub fn advert_label(self) -> String {
        match (self.stack, self.advert_ms) {
            (Stack::Keepalived, ms) => {
                format!(
                    "advert_int {} (VRRPv{})",
                    ka_interval(ms),
                    self.vrrp_version
                )
            }
            (_, ms) if ms.is_multiple_of(1000) => {
                format!("{} s (VRRPv{})", ms / 1000, self.vrrp_version)
            }
            (_, ms) => format!("{ms} ms (VRRPv{})", self.vrrp_version),
        }
    }

    /// Short name for logs and file names.
    pub fn name(self) -> String {
        match self.stack.lb_mode() {
            Some("nat") => format!("lb-{}ms", self.advert_ms),
            Some(mode) => format!("lb-{mode}-{}ms", self.advert_ms),
            None => format!("keepalived-v{}-{}ms", self.vrrp_version, self.advert_ms),
        }
    }

    pub fn advert(self) -> Duration {
        Duration::from_millis(self.advert_ms)
    }

    /// The backup's skew time (RFC 5798; the same as v2's at whole seconds).
    pub fn skew(self, backup_priority: u8) -> Duration {
        self.advert() * (256 - u32::from(backup_priority)) / 256
    }

    /// The latest the backup (priority 100 on both stacks) takes over: a dead master is
    /// noticed after three missed adverts plus the skew time, a resigning one (priority 0)
    /// after the skew time.
    pub fn takeover_bound(self, stop: Stop) -> Duration {
        let skew = self.skew(100);
        match stop {
            Stop::Kill => self.advert() * 3 + skew,
            Stop::Term => skew,
        }
    }
}

/// keepalived's advert_int: seconds, "0.1" for 100 ms.
fn ka_interval(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}", ms as f64 / 1000.0)
    }
}

/// How the master goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stop {
    /// Every process of the master's namespace SIGKILLed and its link set down.
    Kill,
    /// SIGTERM to the master's agent (lb) or to keepalived and HAProxy.
    Term,
}

impl Stop {
    pub const ALL: [Stop; 2] = [Stop::Kill, Stop::Term];

    pub fn name(self) -> &'static str {
        match self {
            Stop::Kill => "kill",
            Stop::Term => "sigterm",
        }
    }
}

/// What the gap client reported (lb-loadgen `--gap`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GapReport {
    /// The longest time between two successful answers (or from the start, or to the end,
    /// when failures sit there), ms.
    pub max_gap_ms: f64,
    pub ok: u64,
    pub failed: u64,
    /// A request succeeded after the last failure: when false, the run ended in the outage
    /// and its gap is only a lower bound.
    pub recovered: bool,
    pub elapsed_ms: u64,
    /// Failures by reason.
    pub errors: BTreeMap<String, u64>,
    /// Every gap longer than three request intervals, (start, end) in ms from the client's
    /// start.
    pub gaps: Vec<(f64, f64)>,
}

/// Parses lb-loadgen's `--gap` report.
pub fn gap_report(v: &serde_json::Value) -> Result<GapReport> {
    ensure!(v["mode"] == "gap", "not a gap report: {v}");
    let n = |k: &str| {
        v[k].as_u64()
            .with_context(|| format!("gap report without {k}: {v}"))
    };
    let errors = match v["errors"].as_object() {
        Some(m) => m
            .iter()
            .map(|(k, c)| Ok((k.clone(), c.as_u64().context("error count")?)))
            .collect::<Result<_>>()?,
        None => BTreeMap::new(),
    };
    let gaps = match v["gaps"].as_array() {
        Some(a) => a
            .iter()
            .map(|g| {
                Ok((
                    g["start_ms"].as_f64().context("gap start_ms")?,
                    g["end_ms"].as_f64().context("gap end_ms")?,
                ))
            })
            .collect::<Result<_>>()?,
        None => bail!("gap report without gaps: {v}"),
    };
    Ok(GapReport {
        gaps,
        max_gap_ms: v["max_gap_ms"]
            .as_f64()
            .with_context(|| format!("gap report without max_gap_ms: {v}"))?,
        ok: n("ok")?,
        failed: n("failed")?,
        recovered: v["last_ok"]
            .as_bool()
            .with_context(|| format!("gap report without last_ok: {v}"))?,
        elapsed_ms: n("elapsed_ms")?,
        errors,
    })
}

/// One measured failover.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub variant: Variant,
    pub stop: Stop,
    pub run: usize,
    pub client: GapReport,
    /// When the backup held the VIP, from the stop (polled every ~10 ms), ms.
    pub vip_moved_ms: Option<f64>,
    /// How long the client ran; the master was stopped `lead_ms` into it.
    pub client_ms: u64,
    pub lead_ms: u64,
    /// SYNs the backends dropped on a tuple in TIME_WAIT during the client's run (TcpExt
    /// PAWSTimewait): an LB reused a source port a backend still held.
    pub backend_paws_drops: u64,
    /// The machine's 1-minute load average after the run (other work shares the cores).
    pub load1: Option<f64>,
}

impl Sample {
    /// The backup held the VIP later than VRRP allows (plus 50 ms for the polling).
    pub fn late(&self) -> bool {
        let due = self.variant.takeover_bound(self.stop).as_secs_f64() * 1000.0 + 50.0;
        self.vip_moved_ms.is_none_or(|m| m > due)
    }
}

/// The runs of one case and their median.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub variant: Variant,
    pub stop: Stop,
    /// The client's longest gap in each run, in run order, ms.
    pub gaps_ms: Vec<f64>,
    pub median_gap_ms: Option<f64>,
    pub median_vip_moved_ms: Option<f64>,
    /// Every run recovered within the client's run (else a gap is a lower bound).
    pub all_recovered: bool,
}

/// The configs and commands used, verbatim.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    /// lb1's agent configs at 100 ms and at 1 s (lb2's differ in priority, pin path and
    /// socket).
    pub lb_agent: Vec<String>,
    /// lb1's keepalived.conf for VRRPv2 at 1 s and v3 at 0.1 s (lb2's: BACKUP, 100).
    pub keepalived: Vec<String>,
    pub haproxy: String,
    /// The client's command line.
    pub loadgen: String,
    /// Variants in the order each run visited them.
    pub order: Vec<Vec<String>>,
}

/// Everything the failover benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    pub options: FailoverOptions,
    pub samples: Vec<Sample>,
    pub summary: Vec<Summary>,
    pub setup: Setup,
    /// Facts checked along the way.
    pub checks: Vec<String>,
    /// Long-lived connections through a failover, per stack and run.
    pub survival: Vec<Survival>,
}

impl Failover {
    /// The summary of one case.
    pub fn get(&self, v: Variant, stop: Stop) -> Option<&Summary> {
        self.summary
            .iter()
            .find(|s| s.variant == v && s.stop == stop)
    }
}

/// Medians per case, runs in order.
pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut out = Vec::new();
    for v in Variant::ALL {
        for stop in Stop::ALL {
            let mut runs: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.variant == v && s.stop == stop)
                .collect();
            if runs.is_empty() {
                continue;
            }
            runs.sort_by_key(|s| s.run);
            let gaps: Vec<f64> = runs.iter().map(|s| s.client.max_gap_ms).collect();
            let moved: Vec<f64> = runs.iter().filter_map(|s| s.vip_moved_ms).collect();
            out.push(Summary {
                variant: v,
                stop,
                median_gap_ms: stats::median(&gaps),
                median_vip_moved_ms: if moved.len() == runs.len() {
                    stats::median(&moved)
                } else {
                    None
                },
                all_recovered: runs.iter().all(|s| s.client.recovered),
                gaps_ms: gaps,
            });
        }
    }
    out
}

/// keepalived.conf as the kubeadm guide writes it (docs/ha-considerations.md, "keepalived
/// configuration"), without its check_apiserver track script; VRRPv3 has no authentication.
pub fn keepalived_conf(v: Variant, node: usize) -> String {
    let (state, prio) = if node == 0 {
        ("MASTER", KA_PRIORITIES[0])
    } else {
        ("BACKUP", KA_PRIORITIES[1])
    };
    let version = if v.vrrp_version == 2 {
        String::new()
    } else {
        format!("    vrrp_version {}\n", v.vrrp_version)
    };
    let auth = if v.vrrp_version == 2 {
        format!(
            "    authentication {{\n        auth_type PASS\n        auth_pass {KA_AUTH_PASS}\n    }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "! Configuration File for keepalived (the kubeadm HA guide's; its vrrp_script\n\
         ! check_apiserver and track_script are left out, see docs/benchmarks.md)\n\
         global_defs {{\n    router_id LVS_DEVEL\n{version}}}\n\n\
         vrrp_instance VI_1 {{\n    state {state}\n    interface eth0\n    virtual_router_id 51\n    \
         priority {prio}\n    advert_int {}\n{auth}    virtual_ipaddress {{\n        {VIP}\n    }}\n}}\n",
        ka_interval(v.advert_ms)
    )
}

/// HAProxy as the kubeadm guide sets it up (mode tcp, `bind *:6443`, roundrobin, HTTP
/// check of /healthz), with the checks over TLS (`check check-ssl verify none`: the stubs
/// speak HTTPS) and the `default-server` line of the common variant of that config.
pub fn haproxy_cfg(lab: &Lab) -> String {
    let mut t = format!(
        "{HAPROXY_GUIDE_DEFAULTS}frontend apiserver
    bind *:{VIP_PORT}
    mode tcp
    option tcplog
    default_backend apiserverbackend

backend apiserverbackend
    option httpchk GET /healthz
    http-check expect status 200
    mode tcp
    balance     roundrobin
    default-server inter 10s downinter 5s rise 2 fall 2 slowstart 60s maxconn 250 maxqueue 256 weight 100
"
    );
    for (i, h) in lab.backends.iter().enumerate() {
        t.push_str(&format!(
            "    server {} {}:{VIP_PORT} check check-ssl verify none\n",
            backend_name(i),
            h.addr
        ));
    }
    t
}

fn agent_vrrp(v: Variant, node: usize) -> String {
    let interval = if v.advert_ms.is_multiple_of(1000) {
        format!("{}s", v.advert_ms / 1000)
    } else {
        format!("{}ms", v.advert_ms)
    };
    format!(
        "virtual_router_id = 51\npriority = {}\nversion = {}\nadvert_interval = \"{interval}\"",
        LB_PRIORITIES[node], v.vrrp_version
    )
}

/// The client's arguments for a run of `d`.
fn loadgen_args(o: &FailoverOptions, d: Duration) -> Vec<String> {
    vec![
        "--gap".into(),
        "--new-connection".into(),
        "--interval".into(),
        format!("{}ms", o.interval.as_millis()),
        "--duration".into(),
        format!("{}ms", d.as_millis()),
        "--timeout".into(),
        format!("{}ms", o.timeout.as_millis()),
    ]
}

/// The client's lead before the stop and its whole run. Run `run` of `o.runs` adds
/// (run + 1/2) / runs of an advert interval to the lead, so the runs stop the master at
/// points spread evenly over the advert cycle; the run is the lead, the takeover bound and
/// the margin, rounded up to 100 ms.
fn client_duration(
    o: &FailoverOptions,
    v: Variant,
    stop: Stop,
    run: usize,
) -> (Duration, Duration) {
    let base = if v.advert_ms >= 1000 {
        o.lead_slow
    } else {
        o.lead
    };
    let runs = o.runs.max(1) as u64;
    let phase_ms = (v.advert_ms * (2 * run as u64 + 1)).div_ceil(2 * runs);
    let lead = base + Duration::from_millis(phase_ms);
    let d = lead + v.takeover_bound(stop) + o.margin;
    let ms = d.as_millis().div_ceil(100) * 100;
    (lead, Duration::from_millis(ms as u64))
}

/// One LB's processes.
#[derive(Default)]
struct Node {
    agent: Option<Proc>,
    keepalived: Option<Proc>,
    haproxy: Option<Proc>,
}

impl Node {
    fn procs(&mut self) -> impl Iterator<Item = &mut Proc> {
        [&mut self.keepalived, &mut self.haproxy, &mut self.agent]
            .into_iter()
            .flatten()
    }

    /// Waits for each process to end; names those still running after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Vec<String> {
        let mut late = Vec::new();
        for p in self.procs() {
            // pid() is None once reaped (a killed node's processes).
            if p.pid().is_some() && p.wait(timeout).is_none() {
                late.push(p.name.clone());
            }
        }
        *self = Node::default();
        late
    }
}

/// Both LBs running one variant; stopped when dropped.
struct Pair<'a> {
    lab: &'a Lab,
    v: Variant,
    nodes: [Node; 2],
    agent_configs: Vec<PathBuf>,
    haproxy_cfg: PathBuf,
}

impl<'a> Pair<'a> {
    fn start(lab: &'a Lab, v: Variant, haproxy_cfg: PathBuf) -> Result<Self> {
        for i in 0..2 {
            ensure!(
                !lab.has_vip(i),
                "lb{} holds the VIP before {} starts",
                i + 1,
                v.name()
            );
            ensure!(
                !lab.lbs[i].ns.sh("ip link show eth0").contains("xdp"),
                "an XDP program is attached on lb{} before {} starts",
                i + 1,
                v.name()
            );
        }
        let agent_configs = match v.stack.lb_mode() {
            Some(mode) => (0..2)
                .map(|i| {
                    lab.agent_config_vrrp_vip(
                        i,
                        &format!("mode = \"{mode}\""),
                        "",
                        &agent_vrrp(v, i),
                        lab.backends.len(),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        let mut p = Pair {
            lab,
            v,
            nodes: [Node::default(), Node::default()],
            agent_configs,
            haproxy_cfg,
        };
        p.start_node(0)?;
        p.start_node(1)?;
        p.wait_master(0)?;
        Ok(p)
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let lab = self.lab;
        match self.v.stack {
            Stack::Lb | Stack::LbDsrL2 | Stack::LbDsrIpip => {
                self.nodes[i].agent = Some(lab.start_agent(i, &self.agent_configs[i]));
            }
            Stack::Keepalived => {
                let cfg = self.haproxy_cfg.display().to_string();
                let h = lab.spawn(
                    &lab.lbs[i],
                    &format!("haproxy-lb{}", i + 1),
                    &["haproxy", "-db", "-f", &cfg],
                );
                self.nodes[i].haproxy = Some(h);
                let ns = &lab.lbs[i].ns;
                let listening = poll_until(Duration::from_secs(10), || {
                    ns.try_sh(&format!("ss -Hltn 'sport = :{VIP_PORT}'"))
                        .is_ok_and(|s| !s.trim().is_empty())
                });
                if listening.is_none() {
                    let out = self.nodes[i]
                        .haproxy
                        .as_ref()
                        .map(Proc::output)
                        .unwrap_or_default();
                    bail!("HAProxy on lb{} does not listen:\n{out}", i + 1);
                }
                self.nodes[i].keepalived =
                    Some(lab.start_keepalived(i, &keepalived_conf(self.v, i)));
            }
        }
        Ok(())
    }

    /// Waits until LB `i` alone holds the VIP (and, for lb, says it is master) and the
    /// client gets answers through it.
    fn wait_master(&self, i: usize) -> Result<()> {
        let lab = self.lab;
        let other = 1 - i;
        let timeout = Duration::from_secs(5) + self.v.advert() * 8;
        let ok = poll_until(timeout, || {
            lab.has_vip(i)
                && !lab.has_vip(other)
                && (self.v.stack == Stack::Keepalived
                    || lab.vrrp_state(&self.agent_configs[i]) == "master")
        });
        if ok.is_none() {
            bail!(
                "{}: lb{} did not become the only master within {timeout:?} (VIP on lb1 {}, \
                 lb2 {}){}",
                self.v.name(),
                i + 1,
                lab.has_vip(0),
                lab.has_vip(1),
                self.diagnostics()
            );
        }
        wait_serving(lab, Duration::from_secs(10))
            .with_context(|| format!("{}: after lb{} became master", self.v.name(), i + 1))
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        if self.v.stack != Stack::Keepalived {
            for (i, c) in self.agent_configs.iter().enumerate() {
                s.push_str(&format!(
                    "\nlb{} vrrp: {:?}",
                    i + 1,
                    self.lab.vrrp_status(c)
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for p in [&n.agent, &n.keepalived, &n.haproxy].into_iter().flatten() {
                let out = p.output();
                let tail: Vec<&str> = out.lines().rev().take(15).collect();
                s.push_str(&format!(
                    "\n--- {} on lb{} (last lines):\n{}",
                    p.name,
                    i + 1,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        s
    }

    /// Stops the master (lb1) the way `stop` says; returns when the signals are sent (a
    /// SIGKILLed node is gone by then).
    fn stop_master(&mut self, stop: Stop) -> Result<()> {
        let lab = self.lab;
        let n = &mut self.nodes[0];
        match stop {
            Stop::Kill => {
                let main = match self.v.stack {
                    Stack::Keepalived => n.keepalived.as_mut(),
                    _ => n.agent.as_mut(),
                }
                .context("no process on lb1 to kill")?;
                // SIGKILL to it and to every other process of the namespace (HAProxy,
                // keepalived's VRRP child), link down.
                lab.kill_node(0, main);
            }
            Stop::Term => {
                for p in n.procs() {
                    p.signal(Signal::SIGTERM);
                }
            }
        }
        Ok(())
    }

    /// After a stop: waits for lb1's processes to end (checking that a SIGTERMed agent
    /// exits cleanly) and, after a kill, brings its link back up.
    fn settle(&mut self, stop: Stop) -> Result<()> {
        let n = &mut self.nodes[0];
        for p in n.procs().filter(|p| p.pid().is_some()) {
            let st = p
                .wait(Duration::from_secs(15))
                .with_context(|| format!("{} on lb1 did not exit", p.name))?;
            if stop == Stop::Term && p.name.starts_with("agent") {
                ensure!(
                    st.success(),
                    "lb-agent exited with {st} after SIGTERM:\n{}",
                    p.output()
                );
            }
        }
        self.nodes[0] = Node::default();
        if stop == Stop::Kill {
            self.lab.revive_node(0);
        }
        Ok(())
    }

    /// Starts lb1 again and waits until it is master (it preempts).
    fn restore(&mut self) -> Result<()> {
        self.start_node(0)?;
        self.wait_master(0)
    }

    /// SIGTERM to every process on both LBs at once, then waits; names those still running.
    fn stop_all(&mut self) -> Vec<String> {
        for n in &mut self.nodes {
            for p in n.procs() {
                p.signal(Signal::SIGTERM);
            }
        }
        let mut late = Vec::new();
        for n in &mut self.nodes {
            late.extend(n.wait(Duration::from_secs(10)));
        }
        late
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        self.stop_all();
        for h in &self.lab.lbs {
            let _ =
                h.ns.try_sh(&format!("ip addr del {VIP}/32 dev eth0 2>/dev/null"));
        }
    }
}

/// Polls until the client gets an answer through the VIP.
fn wait_serving(lab: &Lab, timeout: Duration) -> Result<()> {
    let ca = lab.dir.join("pki/ca.crt");
    let cmd = format!(
        "curl -sf -o /dev/null --max-time 1 --cacert {} https://{VIP}:{VIP_PORT}/version",
        ca.display()
    );
    let ok = poll_until(timeout, || lab.client.ns.try_sh(&cmd).is_ok());
    ensure!(ok.is_some(), "the VIP does not answer the client");
    Ok(())
}

/// Runs every case; `stop` is polled between runs (Ctrl-C), `log` gets progress.
pub fn run(
    lab: &Lab,
    o: &FailoverOptions,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<Failover> {
    ensure!(lab.lbs.len() == 2, "the failover lab needs two LBs");
    // On every address: the DSR cases deliver packets addressed to the VIP.
    let stubs = lab.start_stubs_any();
    let haproxy_path = lab.dir.join("haproxy.cfg");
    let mut setup = Setup {
        haproxy: haproxy_cfg(lab),
        ..Default::default()
    };
    fs::write(&haproxy_path, &setup.haproxy)?;
    let mut samples = Vec::new();
    let mut checks = Vec::new();
    for run in 0..o.runs {
        let mut order = Variant::ALL.to_vec();
        let n = order.len();
        order.rotate_left(run % n);
        setup.order.push(order.iter().map(|v| v.name()).collect());
        for v in order {
            if stop() {
                bail!("interrupted");
            }
            let mut pair = Pair::start(lab, v, haproxy_path.clone())?;
            match v.stack {
                Stack::Lb | Stack::LbDsrL2 | Stack::LbDsrIpip => {
                    let cfg = fs::read_to_string(&pair.agent_configs[0])?;
                    if !setup.lb_agent.contains(&cfg) {
                        setup.lb_agent.push(cfg);
                    }
                }
                Stack::Keepalived => {
                    let conf = keepalived_conf(v, 0);
                    if !setup.keepalived.contains(&conf) {
                        setup.keepalived.push(conf);
                    }
                }
            }
            for (k, s) in Stop::ALL.into_iter().enumerate() {
                if stop() {
                    bail!("interrupted");
                }
                let last = k + 1 == Stop::ALL.len();
                if last {
                    checks.push(check_after(&pair, run + 1));
                }
                let sample = measure(&mut pair, o, s, run, &mut setup)?;
                log(&format!(
                    "failover run {}: {:<20} {:<7} longest gap {:>6.0} ms{}  VIP on lb2 after {}  ({} ok, {} failed{}; {} PAWS drops on backends)",
                    run + 1,
                    v.name(),
                    s.name(),
                    sample.client.max_gap_ms,
                    if sample.client.recovered { "" } else { " (not recovered by the end of the run)" },
                    sample
                        .vip_moved_ms
                        .map(|m| format!("{m:.0} ms"))
                        .unwrap_or_else(|| "never".into()),
                    sample.client.ok,
                    sample.client.failed,
                    if sample.client.errors.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ": {}",
                            sample
                                .client
                                .errors
                                .iter()
                                .map(|(k, n)| format!("{n} {k}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    sample.backend_paws_drops
                ));
                samples.push(sample);
                pair.settle(s)?;
                // After the last case the variant ends: no need for lb1 again.
                if !last {
                    pair.restore()?;
                }
            }
            let late = pair.stop_all();
            ensure!(late.is_empty(), "{late:?} did not stop on SIGTERM");
            for i in 0..2 {
                ensure!(
                    !lab.has_vip(i),
                    "{}: lb{} kept the VIP after its processes stopped",
                    v.name(),
                    i + 1
                );
            }
            drop(pair);
        }
    }
    let mut survival = Vec::new();
    for run in 0..o.runs {
        for stack in SURVIVAL_STACKS {
            if stop() {
                bail!("interrupted");
            }
            let s = survival_case(lab, stack, run, &haproxy_path)?;
            log(&format!(
                "failover run {}: {:<20} kill    {} of {} long-lived connections carried on \
                 ({} failed requests, {} reconnects, longest request {} ms)",
                run + 1,
                stack.label(),
                s.survived,
                s.connections,
                s.failed_requests,
                s.reconnects,
                s.max_request_ms
            ));
            survival.push(s);
        }
    }
    drop(stubs);
    let summary = summarize(&samples);
    Ok(Failover {
        options: o.clone(),
        samples,
        summary,
        setup,
        checks,
        survival,
    })
}

/// 30 long-lived connections (a request every 100 ms, 1 s budget each) through `stack`
/// at 100 ms adverts; the master is killed 2 s in. DSR stacks get their backends set up
/// for the case and undone after it.
fn survival_case(lab: &Lab, stack: Stack, run: usize, haproxy: &Path) -> Result<Survival> {
    let v = Variant {
        stack,
        vrrp_version: 3,
        advert_ms: 100,
    };
    let dsr = stack.lb_mode().filter(|m| *m != "nat");
    if let Some(mode) = dsr {
        for i in 0..lab.backends.len() {
            super::e2e::backend_setup(lab, i, mode, false)?;
        }
    }
    let measured = (|| {
        let mut pair = Pair::start(lab, v, haproxy.to_path_buf())?;
        let client = lab.spawn_long_lived_with(&format!("survival-{}-{run}", v.name()), 6, "1s");
        std::thread::sleep(Duration::from_secs(2));
        pair.stop_master(Stop::Kill)?;
        let report = client.finish(Duration::from_secs(30));
        pair.settle(Stop::Kill)?;
        // A killed agent leaves its data plane attached and pinned (by design): lb1's next
        // agent adopts it, and its SIGTERM below takes it away.
        pair.restore()?;
        let late = pair.stop_all();
        ensure!(late.is_empty(), "{late:?} did not stop on SIGTERM");
        let conns = report["connections"]
            .as_array()
            .with_context(|| format!("long-lived report without connections: {report}"))?;
        let n = |c: &serde_json::Value, k: &str| c[k].as_u64().unwrap_or(0);
        Ok(Survival {
            stack,
            run,
            connections: conns.len() as u64,
            survived: conns
                .iter()
                .filter(|c| n(c, "requests_failed") == 0 && n(c, "reconnects") == 0)
                .count() as u64,
            failed_requests: conns.iter().map(|c| n(c, "requests_failed")).sum(),
            reconnects: conns.iter().map(|c| n(c, "reconnects")).sum(),
            max_request_ms: report["max_request_ms"].as_u64().unwrap_or(0),
        })
    })();
    if let Some(mode) = dsr {
        for i in 0..lab.backends.len() {
            super::e2e::backend_setup(lab, i, mode, true)?;
        }
    }
    measured
}

/// One failover: the client starts, the master stops `lead` into its run, the client runs
/// on until well after the backup should have taken over.
fn measure(
    pair: &mut Pair,
    o: &FailoverOptions,
    stop: Stop,
    run: usize,
    setup: &mut Setup,
) -> Result<Sample> {
    let lab = pair.lab;
    let v = pair.v;
    let (lead, d) = client_duration(o, v, stop, run);
    let args = loadgen_args(o, d);
    if setup.loadgen.is_empty() {
        setup.loadgen = format!(
            "lb-loadgen --url https://{VIP}:{VIP_PORT}/version --ca ca.crt {}",
            loadgen_args(o, Duration::ZERO)
                .join(" ")
                .replace("--duration 0ms", "--duration DURATION")
        );
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Each case on its own: what the restore before it left in TIME_WAIT on the backends
    // (an agent started again hands out SNAT ports from a new random point, possibly ones
    // its previous run used less than 60 s ago) is not this case's doing.
    for h in &lab.backends {
        let _ = h.ns.try_sh("ss -K state time-wait >/dev/null 2>&1");
    }
    let paws0 = backend_paws(lab);
    let client = lab.spawn_loadgen(
        &format!("failover-{}-{}-{run}", v.name(), stop.name()),
        "/version",
        &args,
    );
    std::thread::sleep(lead);
    let t0 = Instant::now();
    pair.stop_master(stop)?;
    let moved = poll_until(d - lead + Duration::from_secs(1), || lab.has_vip(1))
        .map(|t| (t - t0).as_secs_f64() * 1000.0);
    let report = client.finish(d + Duration::from_secs(15));
    let paws1 = backend_paws(lab);
    Ok(Sample {
        backend_paws_drops: paws1.saturating_sub(paws0),
        load1: fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok()),
        variant: v,
        stop,
        run,
        client: gap_report(&report)?,
        vip_moved_ms: moved,
        client_ms: d.as_millis() as u64,
        lead_ms: lead.as_millis() as u64,
    })
}

/// A TCP counter of one namespace (0 when absent).
fn tcp_counter(ns: &crate::netns::Netns, name: &str) -> u64 {
    ns.try_sh("cat /proc/net/netstat /proc/net/snmp")
        .map(|t| parse::net_counters(&t).get(name).copied().unwrap_or(0))
        .unwrap_or(0)
}

fn backend_paws(lab: &Lab) -> u64 {
    lab.backends
        .iter()
        .map(|h| tcp_counter(&h.ns, "TcpExt:PAWSTimewait"))
        .sum()
}

/// What the variant's own view says after its runs: lb's VRRP counters, HAProxy's servers.
fn check_after(pair: &Pair, run: usize) -> String {
    let lab = pair.lab;
    let v = pair.v;
    match v.stack {
        Stack::Lb | Stack::LbDsrL2 | Stack::LbDsrIpip => {
            let s1 = lab.vrrp_status(&pair.agent_configs[0]).unwrap_or_default();
            let s2 = lab.vrrp_status(&pair.agent_configs[1]).unwrap_or_default();
            let bad = |s: &serde_json::Value| {
                s["bad_packets"]
                    .as_object()
                    .map(|m| {
                        if m.is_empty() {
                            "none".to_string()
                        } else {
                            serde_json::Value::Object(m.clone()).to_string()
                        }
                    })
                    .unwrap_or_else(|| "n/a".into())
            };
            format!(
                "run {run}: {}: lb1 {} (priority {}), lb2 {} hearing master {}; bad VRRP \
                 packets lb1 {}, lb2 {}",
                v.name(),
                s1["state"].as_str().unwrap_or("?"),
                s1["effective_priority"],
                s2["state"].as_str().unwrap_or("?"),
                s2["master"].as_str().unwrap_or("?"),
                bad(&s1),
                bad(&s2)
            )
        }
        Stack::Keepalived => {
            let down: Vec<String> = pair
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    let out = n.haproxy.as_ref()?.output();
                    (out.contains("is DOWN") || out.contains("no server available"))
                        .then(|| format!("lb{}", i + 1))
                })
                .collect();
            format!(
                "run {run}: {}: lb1 holds the VIP, lb2 does not; HAProxy servers {}",
                v.name(),
                if down.is_empty() {
                    "up on both LBs".to_string()
                } else {
                    format!("went down on {}", down.join(", "))
                }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_gap_report() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"mode":"gap","ok":120,"failed":3,"max_gap_ms":412.5,"gaps":[{"start_ms":1500.0,"end_ms":1912.5}],
                "last_ok":true,"errors":{"connect timeout":2,"tls timeout":1},"backends":{"master01":40},"elapsed_ms":3400}"#,
        )
        .unwrap();
        let g = gap_report(&v).unwrap();
        assert_eq!(g.max_gap_ms, 412.5);
        assert_eq!((g.ok, g.failed, g.elapsed_ms), (120, 3, 3400));
        assert!(g.recovered);
        assert_eq!(g.errors["connect timeout"], 2);
        assert_eq!(g.gaps, vec![(1500.0, 1912.5)]);
        let mut v2 = v.clone();
        v2["last_ok"] = false.into();
        v2["errors"] = serde_json::json!({});
        v2["gaps"] = serde_json::json!([]);
        let g = gap_report(&v2).unwrap();
        assert!(!g.recovered);
        assert!(g.errors.is_empty() && g.gaps.is_empty());
        v2["mode"] = "long".into();
        assert!(gap_report(&v2).is_err());
        let mut v3 = v;
        v3.as_object_mut().unwrap().remove("last_ok");
        assert!(gap_report(&v3).is_err());
    }

    #[test]
    fn takeover_bounds_and_client_runs() {
        let [lb100, ka100, lb1s, ka1s] = Variant::ALL;
        // 3 x 100 ms + 100 ms x 156/256.
        assert_eq!(
            lb100.takeover_bound(Stop::Kill),
            Duration::from_nanos(360_937_500)
        );
        assert_eq!(
            ka100.takeover_bound(Stop::Term),
            Duration::from_nanos(60_937_500)
        );
        assert_eq!(
            lb1s.takeover_bound(Stop::Kill),
            Duration::from_nanos(3_609_375_000)
        );
        let o = FailoverOptions::full();
        // The lead adds 1/6, 3/6, 5/6 of an advert interval over three runs.
        assert_eq!(
            client_duration(&o, lb100, Stop::Kill, 0),
            (Duration::from_millis(1517), Duration::from_millis(2900))
        );
        assert_eq!(
            client_duration(&o, ka1s, Stop::Kill, 1),
            (Duration::from_millis(2500), Duration::from_millis(7200))
        );
        assert_eq!(
            client_duration(&o, ka1s, Stop::Term, 2),
            (Duration::from_millis(2834), Duration::from_millis(4500))
        );
        // One run (--quick): half an interval.
        assert_eq!(
            client_duration(&FailoverOptions::quick(), lb1s, Stop::Kill, 0),
            (Duration::from_millis(2000), Duration::from_millis(6300))
        );
        assert_eq!(
            loadgen_args(&o, Duration::from_millis(2900)).join(" "),
            "--gap --new-connection --interval 20ms --duration 2900ms --timeout 200ms"
        );
    }

    #[test]
    fn labels_and_configs() {
        let [lb100, ka100, lb1s, ka1s] = Variant::ALL;
        assert_eq!(lb100.advert_label(), "100 ms (VRRPv3)");
        assert_eq!(lb1s.advert_label(), "1 s (VRRPv3)");
        assert_eq!(ka100.advert_label(), "advert_int 0.1 (VRRPv3)");
        assert_eq!(ka1s.advert_label(), "advert_int 1 (VRRPv2)");
        assert_eq!(
            agent_vrrp(lb1s, 1),
            "virtual_router_id = 51\npriority = 100\nversion = 3\nadvert_interval = \"1s\""
        );
        let v2 = keepalived_conf(ka1s, 0);
        assert!(
            v2.contains("state MASTER") && v2.contains("priority 101"),
            "{v2}"
        );
        assert!(
            v2.contains("advert_int 1\n") && v2.contains("auth_pass 42"),
            "{v2}"
        );
        assert!(!v2.contains("vrrp_version"), "{v2}");
        let v3 = keepalived_conf(ka100, 1);
        assert!(
            v3.contains("state BACKUP") && v3.contains("priority 100"),
            "{v3}"
        );
        assert!(
            v3.contains("vrrp_version 3") && v3.contains("advert_int 0.1\n"),
            "{v3}"
        );
        assert!(!v3.contains("authentication"), "{v3}");
    }

    fn sample(v: Variant, stop: Stop, run: usize, gap: f64, recovered: bool) -> Sample {
        Sample {
            variant: v,
            stop,
            run,
            client: GapReport {
                max_gap_ms: gap,
                recovered,
                ..Default::default()
            },
            vip_moved_ms: Some(gap / 2.0),
            client_ms: 3000,
            lead_ms: 1500,
            backend_paws_drops: 0,
            load1: None,
        }
    }

    #[test]
    fn medians_per_case_in_run_order() {
        let [lb100, ka100, ..] = Variant::ALL;
        let s = vec![
            sample(lb100, Stop::Kill, 2, 500.0, true),
            sample(lb100, Stop::Kill, 0, 400.0, true),
            sample(ka100, Stop::Kill, 0, 700.0, true),
            sample(lb100, Stop::Kill, 1, 300.0, true),
            sample(lb100, Stop::Term, 0, 40.0, false),
        ];
        let sum = summarize(&s);
        assert_eq!(sum.len(), 3);
        let f = Failover {
            options: FailoverOptions::quick(),
            samples: s,
            summary: sum,
            setup: Setup::default(),
            checks: vec![],
            survival: vec![],
        };
        let k = f.get(lb100, Stop::Kill).unwrap();
        assert_eq!(k.gaps_ms, vec![400.0, 300.0, 500.0]);
        assert_eq!(k.median_gap_ms, Some(400.0));
        assert_eq!(k.median_vip_moved_ms, Some(200.0));
        assert!(k.all_recovered);
        assert!(!f.get(lb100, Stop::Term).unwrap().all_recovered);
        assert!(f.get(ka100, Stop::Term).is_none());
        // Due by 361 ms (+ 50 ms of polling): 350 is in time, 420 late.
        assert!(!f.samples[4].late());
        assert!(!f.samples[2].late());
        let mut s = sample(lb100, Stop::Kill, 0, 840.0, true);
        assert!(s.late());
        s.vip_moved_ms = None;
        assert!(s.late());
    }
}
