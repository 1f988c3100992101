//! End to end in the lab: wrk in the client namespace, nginx on the three backends, and
//! between them one of four paths: none (direct to one backend), lb (NAT mode, native XDP),
//! HAProxy in TCP mode as the kubeadm HA guide sets it up, and nftables full NAT (dnat +
//! masquerade) standing in for IPVS, which this kernel lacks. Each run visits every path in
//! turn (the order rotates run by run) and measures keep-alive and `Connection: close`.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    load::{
        flush_time_wait, measure_wrk, sh, start_backends, wait_http, wrk, wrk_args, wrk_line,
        CLIENT_SYSCTLS, NGINX_HEALTH,
    },
    parse::{self, Wrk},
    stats,
};
use crate::{
    lab::{backend_name, Lab, Proc, VIP, VIP_PORT},
    netns::Netns,
};

/// How much to measure.
#[derive(Clone, Debug, Serialize)]
pub struct E2eOptions {
    pub runs: usize,
    /// Length of each measured wrk run.
    pub duration: Duration,
    /// A wrk run after a path is set up, not measured.
    pub warmup: Duration,
    pub threads: u32,
    pub connections: u32,
}

impl E2eOptions {
    /// What `cargo xtask bench` measures.
    pub fn full() -> Self {
        Self {
            runs: 3,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            threads: 2,
            connections: 32,
        }
    }

    /// `--quick`: shorter runs.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_secs(3),
            warmup: Duration::from_secs(1),
            ..Self::full()
        }
    }
}

/// What stands between the client and the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Lb,
    #[serde(rename = "lb-dsr-l2")]
    LbDsrL2,
    #[serde(rename = "lb-dsr-ipip")]
    LbDsrIpip,
    Haproxy,
    Nftables,
}

impl PathKind {
    /// Every path, in the first run's order.
    pub const ALL: [PathKind; 6] = [
        Self::Direct,
        Self::Lb,
        Self::LbDsrL2,
        Self::LbDsrIpip,
        Self::Haproxy,
        Self::Nftables,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (one backend)",
            Self::Lb => "lb (nat, native XDP)",
            Self::LbDsrL2 => "lb (dsr-l2, native XDP)",
            Self::LbDsrIpip => "lb (dsr-ipip, native XDP; TC decap on the backends)",
            Self::Haproxy => "HAProxy (mode tcp)",
            Self::Nftables => "nftables (dnat + masquerade)",
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Lb => "lb",
            Self::LbDsrL2 => "lb-dsr-l2",
            Self::LbDsrIpip => "lb-dsr-ipip",
            Self::Haproxy => "haproxy",
            Self::Nftables => "nftables",
        }
    }

    /// The VIP's `mode` when lb-agent runs the path.
    pub fn lb_mode(self) -> Option<&'static str> {
        match self {
            Self::Lb => Some("nat"),
            Self::LbDsrL2 => Some("dsr-l2"),
            Self::LbDsrIpip => Some("dsr-ipip"),
            _ => None,
        }
    }
}

/// How wrk uses its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Many requests per connection: requests/s.
    KeepAlive,
    /// `Connection: close` for one second from a clean slate (no TIME_WAIT anywhere):
    /// new connections/s before any NAT has to hand out a source port a second time.
    CloseFirstSecond,
    /// `Connection: close`: one request per connection, new connections/s.
    Close,
}

impl Mode {
    /// Every mode, in the order each path runs them.
    pub const ALL: [Mode; 3] = [Self::KeepAlive, Self::CloseFirstSecond, Self::Close];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::CloseFirstSecond => "close-1s",
            Self::Close => "close",
        }
    }
}

/// One measured wrk run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub path: PathKind,
    pub mode: Mode,
    pub run: usize,
    pub wrk: Wrk,
    /// Whole-machine busy CPU during the run (/proc/stat), ms.
    pub busy_ms: f64,
    pub cpu_ms_per_1k: f64,
    /// SYNs the client had to send again (TcpExt TCPSynRetrans).
    pub syn_retrans: u64,
    /// SYNs the backends dropped on a TIME_WAIT tuple for an older timestamp (TcpExt
    /// PAWSTimewait): a NAT reused a tuple for another client connection within 60 s.
    pub paws_timewait: u64,
}

/// Medians of a path and mode over the runs.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub path: PathKind,
    pub mode: Mode,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_ms_per_1k: f64,
    /// wrk's errors over all runs.
    pub errors: u64,
    /// The client's SYN retransmissions over all runs.
    pub syn_retrans: u64,
    /// The backends' PAWSTimewait drops over all runs.
    pub paws_timewait: u64,
}

/// A comparison of two paths: the median of the run-by-run ratios.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub mode: Mode,
    pub value: Option<f64>,
}

/// A path's CPU per 1000 requests above the direct path's (median of run-by-run
/// differences), ms.
#[derive(Clone, Debug, Serialize)]
pub struct Overhead {
    pub path: PathKind,
    pub mode: Mode,
    pub cpu_ms_per_1k: Option<f64>,
}

/// The configs and commands used, verbatim.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    pub nginx: String,
    pub haproxy: String,
    pub nftables: String,
    pub lb_agent: String,
    pub nftables_sysctls: String,
    pub client_sysctls: String,
    pub wrk: Vec<String>,
    pub order: Vec<Vec<PathKind>>,
}

/// Everything the end-to-end comparison measured.
#[derive(Clone, Debug, Serialize)]
pub struct E2e {
    pub options: E2eOptions,
    pub samples: Vec<Sample>,
    pub summary: Vec<Summary>,
    pub ratios: Vec<Ratio>,
    pub overhead: Vec<Overhead>,
    pub setup: Setup,
    /// lb-agent's resident memory after the lb runs (largest seen), KiB.
    pub agent_rss_kib: Option<u64>,
    /// Its peak resident memory, KiB.
    pub agent_hwm_kib: Option<u64>,
    /// Facts checked along the way (which path carried the traffic).
    pub checks: Vec<String>,
}

impl E2e {
    /// The summary of `path` in `mode`.
    pub fn get(&self, path: PathKind, mode: Mode) -> Option<&Summary> {
        self.summary
            .iter()
            .find(|s| s.path == path && s.mode == mode)
    }

    /// The ratio called `name` in `mode`.
    pub fn ratio(&self, name: &str, mode: Mode) -> Option<f64> {
        self.ratios
            .iter()
            .find(|r| r.name == name && r.mode == mode)
            .and_then(|r| r.value)
    }

    /// `path`'s CPU overhead over direct in `mode`.
    pub fn overhead(&self, path: PathKind, mode: Mode) -> Option<f64> {
        self.overhead
            .iter()
            .find(|o| o.path == path && o.mode == mode)
            .and_then(|o| o.cpu_ms_per_1k)
    }
}

/// The kubeadm HA guide's HAProxy `global` and `defaults` sections, shared by the
/// throughput and the failover benchmarks.
pub const HAPROXY_GUIDE_DEFAULTS: &str = "global
    # kubeadm's guide: log /dev/log local0 (no syslog here); daemon (run in the foreground)

defaults
    mode                    http
    option                  dontlognull
    option http-server-close
    option forwardfor       except 127.0.0.0/8
    option                  redispatch
    retries                 1
    timeout http-request    10s
    timeout queue           20s
    timeout connect         5s
    timeout client          35s
    timeout server          35s
    timeout http-keep-alive 10s
    timeout check           10s

";

/// HAProxy as the kubeadm HA guide (docs/ha-considerations.md, "haproxy configuration")
/// sets it up, with plain-HTTP checks since the backends here speak plain HTTP; its `log`
/// lines are left out (no syslog in the lab), which spares HAProxy the logging.
fn haproxy_cfg(lab: &Lab) -> String {
    let mut t = format!(
        "{HAPROXY_GUIDE_DEFAULTS}frontend apiserver
    bind {VIP}:{VIP_PORT}
    mode tcp
    option tcplog
    default_backend apiserverbackend

backend apiserverbackend
    option httpchk GET /healthz
    http-check expect status 200
    mode tcp
    balance     roundrobin
"
    );
    for (i, h) in lab.backends.iter().enumerate() {
        t.push_str(&format!(
            "    server {} {}:{VIP_PORT} check\n",
            backend_name(i),
            h.addr
        ));
    }
    t
}

/// nftables full NAT: round robin over the backends, masquerade to the LB's address.
fn nft_rules(lab: &Lab) -> String {
    let map: Vec<String> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{i} : {}", h.addr))
        .collect();
    format!(
        "table ip lbbench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP} tcp dport {VIP_PORT} counter dnat to numgen inc mod {n} map {{ {m} }}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ct status dnat counter masquerade
    }}
}}
",
        n = lab.backends.len(),
        m = map.join(", ")
    )
}

const NFT_SYSCTLS: &str = "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 \
                           net.ipv4.conf.eth0.send_redirects=0";

/// `lb-agent backend-setup --mode MODE --vip VIP` (or its `--undo`) on backend `i`.
pub fn backend_setup(lab: &Lab, i: usize, mode: &str, undo: bool) -> Result<String> {
    let extra: &[&str] = if undo { &["--undo"] } else { &[] };
    lab.backend_setup(i, mode, extra)
        .map_err(|e| anyhow::anyhow!("backend-setup on {}: {e}", backend_name(i)))
}

fn xdp_on_lb(lab: &Lab) -> Result<bool> {
    Ok(sh(&lab.lbs[0].ns, "ip link show eth0")?.contains("xdp"))
}

/// A path set up; undone when dropped.
enum Active<'a> {
    Direct,
    Lb {
        agent: Proc,
        config: PathBuf,
        /// DSR: the lab whose backends `backend-setup` prepared, undone after the agent.
        dsr: Option<(&'a Lab, &'static str)>,
    },
    Haproxy(Proc),
    Nft(&'a Netns),
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        match self {
            Active::Lb { agent, dsr, .. } => {
                let _ = agent.terminate(Duration::from_secs(10));
                if let Some((lab, mode)) = dsr {
                    for i in 0..lab.backends.len() {
                        let _ = backend_setup(lab, i, mode, true);
                    }
                }
            }
            Active::Haproxy(p) => {
                let _ = p.terminate(Duration::from_secs(5));
            }
            Active::Nft(ns) => {
                let _ = ns.try_sh(
                    "nft delete table ip lbbench; sysctl -qw net.ipv4.ip_forward=0 \
                     net.ipv4.conf.all.send_redirects=1 net.ipv4.conf.eth0.send_redirects=1",
                );
            }
            Active::Direct => {}
        }
    }
}

struct Ctx<'a> {
    lab: &'a Lab,
    o: &'a E2eOptions,
    setup: Setup,
    checks: Vec<String>,
    rss: Option<u64>,
    hwm: Option<u64>,
}

impl<'a> Ctx<'a> {
    fn url(&self, p: PathKind) -> String {
        match p {
            PathKind::Direct => format!("http://{}:{VIP_PORT}/", self.lab.backends[0].addr),
            _ => format!("http://{VIP}:{VIP_PORT}/"),
        }
    }

    fn activate(&mut self, p: PathKind) -> Result<Active<'a>> {
        let lab = self.lab;
        let lb = &lab.lbs[0];
        if p.lb_mode().is_none() {
            ensure!(
                !xdp_on_lb(lab)?,
                "an XDP program is attached on the LB before {p:?}"
            );
        }
        flush_time_wait(lab);
        let active = match p {
            PathKind::Direct => Active::Direct,
            PathKind::Lb | PathKind::LbDsrL2 | PathKind::LbDsrIpip => {
                let mode = p.lb_mode().unwrap_or("nat");
                let dsr = (mode != "nat").then_some((lab, mode));
                if dsr.is_some() {
                    for i in 0..lab.backends.len() {
                        backend_setup(lab, i, mode, false)?;
                    }
                }
                let config = lab.agent_config(0, &format!("mode = \"{mode}\""), NGINX_HEALTH);
                if mode == "nat" {
                    self.setup.lb_agent = fs::read_to_string(&config)?;
                }
                let agent = lab.start_agent(0, &config);
                Active::Lb { agent, config, dsr }
            }
            PathKind::Haproxy => {
                let cfg = lab.dir.join("haproxy.cfg");
                fs::write(&cfg, &self.setup.haproxy)?;
                let cfg = cfg.display().to_string();
                Active::Haproxy(lab.spawn(lb, "haproxy", &["haproxy", "-db", "-f", &cfg]))
            }
            PathKind::Nftables => {
                let file = lab.dir.join("lbbench.nft");
                fs::write(&file, &self.setup.nftables)?;
                let active = Active::Nft(&lb.ns);
                sh(
                    &lb.ns,
                    &format!("{NFT_SYSCTLS} && nft -f {}", file.display()),
                )?;
                active
            }
        };
        wait_http(
            &lab.client.ns.exec_words(),
            &self.url(p),
            Duration::from_secs(15),
        )
        .with_context(|| format!("setting up the {} path", p.name()))?;
        Ok(active)
    }

    /// Checks that `p` carried the traffic, after its runs.
    fn check(&mut self, p: PathKind, active: &Active, run: usize) -> Result<()> {
        let lab = self.lab;
        match (p, active) {
            (
                PathKind::Lb | PathKind::LbDsrL2 | PathKind::LbDsrIpip,
                Active::Lb { agent, config, .. },
            ) => {
                let s = lab.status(config);
                let tx = s["counters"]["tx"].as_u64().unwrap_or(0);
                let flows = s["vips"][0]["new_flows"].as_u64().unwrap_or(0);
                let spread: Vec<String> = s["vips"][0]["backends"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .map(|b| {
                                format!("{} {}", b["name"].as_str().unwrap_or("?"), b["new_flows"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let exhausted = s["counters"]["drop_snat_exhausted"].as_u64().unwrap_or(0);
                ensure!(
                    s["agent"]["xdp_mode"] == "native" && tx > 0 && flows > 0,
                    "lb path: XDP {} sent {tx} packets, {flows} new flows",
                    s["agent"]["xdp_mode"]
                );
                if let Some(pid) = agent.pid() {
                    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let rss = parse::status_kib(&st, "VmRSS");
                    let hwm = parse::status_kib(&st, "VmHWM");
                    self.rss = self.rss.max(rss);
                    self.hwm = self.hwm.max(hwm);
                }
                self.checks.push(format!(
                    "run {run}: lb: XDP native, {tx} packets sent by XDP_TX, {flows} new flows \
                     ({}), {exhausted} SYNs dropped for want of a SNAT port",
                    spread.join(", ")
                ));
            }
            (PathKind::Nftables, _) => {
                let rules = sh(&lab.lbs[0].ns, "nft list table ip lbbench")?;
                let pkts = rules
                    .lines()
                    .find(|l| l.contains("dnat"))
                    .and_then(|l| {
                        let w: Vec<&str> = l.split_whitespace().collect();
                        let i = w.iter().position(|x| *x == "packets")?;
                        w.get(i + 1)?.parse::<u64>().ok()
                    })
                    .unwrap_or(0);
                ensure!(pkts > 0, "nftables path: the dnat rule matched nothing");
                self.checks.push(format!(
                    "run {run}: nftables: the dnat rule translated {pkts} connections"
                ));
            }
            (PathKind::Haproxy, Active::Haproxy(h)) => {
                let out = h.output();
                ensure!(
                    !out.contains("is DOWN") && !out.contains("has no server available"),
                    "haproxy: a backend went down:\n{out}"
                );
                self.checks
                    .push(format!("run {run}: haproxy: no XDP on the LB, servers up"));
            }
            _ => {}
        }
        Ok(())
    }

    fn measure(&mut self, p: PathKind, mode: Mode, run: usize) -> Result<Sample> {
        let d = match mode {
            Mode::CloseFirstSecond => Duration::from_secs(1),
            _ => self.o.duration,
        };
        if mode != Mode::KeepAlive {
            flush_time_wait(self.lab);
        }
        let args = wrk_args(self.o, mode, &self.url(p), d, None);
        let client = self.lab.client.ns.exec_words();
        let cmd = wrk_line(&client, &args);
        if !self.setup.wrk.contains(&cmd) {
            self.setup.wrk.push(cmd);
        }
        let m = measure_wrk(self.lab, &client, &args, &[], None)
            .with_context(|| format!("{} {}", p.name(), mode.name()))?;
        Ok(Sample {
            path: p,
            mode,
            run,
            cpu_ms_per_1k: m.per_1k(m.busy_ms),
            busy_ms: m.busy_ms,
            wrk: m.wrk,
            syn_retrans: m.syn_retrans,
            paws_timewait: m.paws_timewait,
        })
    }
}

/// Runs the comparison; `stop` is polled between runs (Ctrl-C), `log` gets progress.
pub fn run(
    lab: &Lab,
    o: &E2eOptions,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<E2e> {
    let (nginx, nginx_conf) = start_backends(lab)?;
    // The VIP on the LB answers ARP for every path; lb's XDP program takes its packets
    // before the stack, HAProxy binds it, nftables translates it.
    lab.add_vip(0);
    sh(&lab.client.ns, CLIENT_SYSCTLS)?;
    let mut c = Ctx {
        lab,
        o,
        setup: Setup {
            nginx: nginx_conf,
            haproxy: haproxy_cfg(lab),
            nftables: nft_rules(lab),
            nftables_sysctls: NFT_SYSCTLS.to_string(),
            client_sysctls: CLIENT_SYSCTLS.to_string(),
            ..Default::default()
        },
        checks: Vec::new(),
        rss: None,
        hwm: None,
    };
    let mut samples = Vec::new();
    for run in 0..o.runs {
        let mut order = PathKind::ALL.to_vec();
        let n = order.len();
        order.rotate_left(run % n);
        c.setup.order.push(order.clone());
        for p in order {
            if stop() {
                bail!("interrupted");
            }
            let active = c.activate(p)?;
            let warmup = wrk_args(o, Mode::KeepAlive, &c.url(p), o.warmup, None);
            let _ = wrk(&lab.client.ns.exec_words(), &warmup)?;
            for mode in Mode::ALL {
                let s = c.measure(p, mode, run)?;
                log(&format!(
                    "e2e run {}: {:<9} {:<10} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  {:>6.1} CPU ms/1k req{}{}",
                    run + 1,
                    p.name(),
                    mode.name(),
                    s.wrk.rps,
                    s.wrk.p50_us,
                    s.wrk.p99_us,
                    s.cpu_ms_per_1k,
                    if s.syn_retrans > 0 {
                        format!("  {} SYN retransmits ({} PAWS drops on backends)", s.syn_retrans, s.paws_timewait)
                    } else {
                        String::new()
                    },
                    if s.wrk.errors() > 0 {
                        format!("  ({} errors)", s.wrk.errors())
                    } else {
                        String::new()
                    }
                ));
                samples.push(s);
            }
            c.check(p, &active, run + 1)?;
            drop(active);
        }
    }
    drop(nginx);
    Ok(summarize(o, samples, c.setup, c.checks, c.rss, c.hwm))
}

fn series(samples: &[Sample], p: PathKind, m: Mode, f: fn(&Sample) -> f64) -> Vec<f64> {
    stats::series(samples, |s| s.path == p && s.mode == m, |s| s.run, f)
}

/// Medians, run-by-run ratios and CPU overheads from the samples.
pub fn summarize(
    o: &E2eOptions,
    samples: Vec<Sample>,
    setup: Setup,
    checks: Vec<String>,
    rss: Option<u64>,
    hwm: Option<u64>,
) -> E2e {
    let med = |v: Vec<f64>| stats::median(&v).unwrap_or(f64::NAN);
    let mut summary = Vec::new();
    let mut ratios = Vec::new();
    let mut overhead = Vec::new();
    for m in Mode::ALL {
        for p in PathKind::ALL {
            if !samples.iter().any(|s| s.path == p && s.mode == m) {
                continue;
            }
            summary.push(Summary {
                path: p,
                mode: m,
                rps: med(series(&samples, p, m, |s| s.wrk.rps)),
                p50_us: med(series(&samples, p, m, |s| s.wrk.p50_us)),
                p99_us: med(series(&samples, p, m, |s| s.wrk.p99_us)),
                cpu_ms_per_1k: med(series(&samples, p, m, |s| s.cpu_ms_per_1k)),
                errors: samples
                    .iter()
                    .filter(|s| s.path == p && s.mode == m)
                    .map(|s| s.wrk.errors())
                    .sum(),
                syn_retrans: samples
                    .iter()
                    .filter(|s| s.path == p && s.mode == m)
                    .map(|s| s.syn_retrans)
                    .sum(),
                paws_timewait: samples
                    .iter()
                    .filter(|s| s.path == p && s.mode == m)
                    .map(|s| s.paws_timewait)
                    .sum(),
            });
        }
        for lb_path in [PathKind::Lb, PathKind::LbDsrL2, PathKind::LbDsrIpip] {
            let lb = series(&samples, lb_path, m, |s| s.wrk.rps);
            let others: &[PathKind] = if lb_path == PathKind::Lb {
                &[PathKind::Direct, PathKind::Haproxy, PathKind::Nftables]
            } else {
                &[PathKind::Direct, PathKind::Lb, PathKind::Haproxy]
            };
            for &other in others {
                ratios.push(Ratio {
                    name: format!("{}/{}", lb_path.name(), other.name()),
                    mode: m,
                    value: stats::median_ratio(&lb, &series(&samples, other, m, |s| s.wrk.rps)),
                });
            }
        }
        let direct = series(&samples, PathKind::Direct, m, |s| s.cpu_ms_per_1k);
        for p in [
            PathKind::Lb,
            PathKind::LbDsrL2,
            PathKind::LbDsrIpip,
            PathKind::Haproxy,
            PathKind::Nftables,
        ] {
            overhead.push(Overhead {
                path: p,
                mode: m,
                cpu_ms_per_1k: stats::median_diff(
                    &series(&samples, p, m, |s| s.cpu_ms_per_1k),
                    &direct,
                ),
            });
        }
        // Overheads compared run by run too: lb's share of HAProxy's.
        let lb_over: Vec<f64> = series(&samples, PathKind::Lb, m, |s| s.cpu_ms_per_1k)
            .iter()
            .zip(&direct)
            .map(|(a, d)| a - d)
            .collect();
        let ha_over: Vec<f64> = series(&samples, PathKind::Haproxy, m, |s| s.cpu_ms_per_1k)
            .iter()
            .zip(&direct)
            .map(|(a, d)| a - d)
            .collect();
        ratios.push(Ratio {
            name: "lb overhead/haproxy overhead".into(),
            mode: m,
            value: stats::median_ratio(&lb_over, &ha_over),
        });
    }
    E2e {
        options: o.clone(),
        samples,
        summary,
        ratios,
        overhead,
        setup,
        agent_rss_kib: rss,
        agent_hwm_kib: hwm,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: PathKind, mode: Mode, run: usize, rps: f64, cpu: f64) -> Sample {
        Sample {
            path,
            mode,
            run,
            wrk: Wrk {
                rps,
                requests: rps as u64 * 10,
                p50_us: 100.0 + run as f64,
                p99_us: 1000.0,
                ..Default::default()
            },
            busy_ms: 0.0,
            cpu_ms_per_1k: cpu,
            syn_retrans: 0,
            paws_timewait: 0,
        }
    }

    #[test]
    fn summary_ratios_and_overheads_are_run_by_run() {
        let mut s = Vec::new();
        for (run, (d, l, h, n)) in [
            (100.0, 90.0, 45.0, 60.0),
            (200.0, 180.0, 60.0, 90.0),
            (150.0, 150.0, 50.0, 100.0),
        ]
        .into_iter()
        .enumerate()
        {
            s.push(sample(PathKind::Direct, Mode::KeepAlive, run, d, 10.0));
            s.push(sample(
                PathKind::Lb,
                Mode::KeepAlive,
                run,
                l,
                11.0 + run as f64,
            ));
            s.push(sample(PathKind::Haproxy, Mode::KeepAlive, run, h, 16.0));
            s.push(sample(PathKind::Nftables, Mode::KeepAlive, run, n, 13.0));
        }
        let e = summarize(
            &E2eOptions::quick(),
            s,
            Setup::default(),
            vec![],
            None,
            None,
        );
        let lb = e.get(PathKind::Lb, Mode::KeepAlive).unwrap();
        assert_eq!(lb.rps, 150.0);
        assert_eq!(lb.p50_us, 101.0);
        assert_eq!(lb.cpu_ms_per_1k, 12.0);
        // lb/direct run by run: 0.9, 0.9, 1.0.
        assert_eq!(e.ratio("lb/direct", Mode::KeepAlive), Some(0.9));
        // lb/haproxy: 2, 3, 3.
        assert_eq!(e.ratio("lb/haproxy", Mode::KeepAlive), Some(3.0));
        // lb/nftables: 1.5, 2, 1.5.
        assert_eq!(e.ratio("lb/nftables", Mode::KeepAlive), Some(1.5));
        assert_eq!(e.overhead(PathKind::Lb, Mode::KeepAlive), Some(2.0));
        assert_eq!(e.overhead(PathKind::Haproxy, Mode::KeepAlive), Some(6.0));
        // lb's overhead over HAProxy's: 1/6, 2/6, 3/6.
        let r = e
            .ratio("lb overhead/haproxy overhead", Mode::KeepAlive)
            .unwrap();
        assert!((r - 2.0 / 6.0).abs() < 1e-9);
        assert!(e.get(PathKind::Lb, Mode::Close).is_none());
        assert_eq!(e.ratio("lb/direct", Mode::Close), None);
    }
}
