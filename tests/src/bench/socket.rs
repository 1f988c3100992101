//! Node-local: lb's socket mode against Kubespray's nginx-proxy, both in the client's
//! namespace (the node), in front of the three nginx backends (the apiservers), with the
//! client going straight to the backends as the baseline. Four cases, visited in turn in
//! each run (the order rotating run by run), each measured with keep-alive and with
//! `Connection: close`:
//! - direct: wrk's three threads each to its own backend (a Lua script sets each thread's
//!   address), so the load spreads over the backends as the proxies spread it;
//! - direct-agent: the same while lb-agent runs as in the socket case: wrk is outside the
//!   cgroup, so what it pays over direct is what the running agent costs anyone else on
//!   the node (with every VIP in socket mode the agent attaches nothing to eth0: no XDP,
//!   no TC program);
//! - socket: lb-agent with a socket-mode VIP at 127.0.0.1:6443 and its hooks on a cgroup
//!   of the bench's (`hooked`); wrk runs inside it against http://127.0.0.1:6443/;
//! - nginx: Kubespray's nginx.conf (its `stream` block, least_conn) listening on
//!   127.0.0.1:6443; wrk outside the hooks' cgroup.
//!
//! Every process of the bench (wrk, the backends, nginx, the agent) runs in one of two
//! cgroups under a cgroup of the bench's, whose CPU time is the bench's own on a machine
//! other work may share.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    e2e::{E2eOptions, Mode, Ratio},
    load::{
        flush_time_wait, measure_wrk, pids_cpu, sh, start_backends, wait_http, with_children, wrk,
        wrk_args, wrk_line, Memory, NGINX_HEALTH,
    },
    micro::{map_infos, MapMem},
    parse::Wrk,
    stats,
};
use crate::{
    cgroup::Cgroup,
    lab::{backend_name, bin, Lab, Proc, VIP_PORT},
};

/// The Kubespray commit whose template the nginx case renders.
pub const KUBESPRAY_COMMIT: &str = "46dbdd3994b32640bcd806b0097f50e8fdf1d514";
/// The template, in Kubespray's repository.
pub const KUBESPRAY_TEMPLATE: &str = "roles/kubernetes/node/templates/loadbalancer/nginx.conf.j2";
/// Debian's nginx has the stream module as a dynamic module (package libnginx-mod-stream).
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Kubespray's `loadbalancer_apiserver_healthcheck_port` (its sample inventory's value).
const HEALTHCHECK_PORT: u16 = 8081;

/// The client is the load generator, as in the end-to-end comparison (`CLIENT_SYSCTLS`),
/// but its ports stop short of 61000: lb-agent refuses to start when the kernel's
/// ephemeral range overlaps its `snat_ports` default (61000-65535), even with only a
/// socket-mode VIP, which never uses them.
pub const CLIENT_SYSCTLS: &str =
    "sysctl -qw net.ipv4.ip_local_port_range='1024 60999' net.ipv4.tcp_tw_reuse=1";

/// How much to measure: `E2eOptions` with three wrk threads, one per backend in the direct
/// case.
pub fn options(quick: bool) -> E2eOptions {
    if quick {
        E2eOptions {
            threads: 3,
            connections: 30,
            ..E2eOptions::quick()
        }
    } else {
        // Five runs: the machine is small and may be shared, and every figure is a median.
        E2eOptions {
            runs: 5,
            threads: 3,
            connections: 30,
            ..E2eOptions::full()
        }
    }
}

/// What the load goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodePath {
    Direct,
    #[serde(rename = "direct-agent")]
    DirectAgent,
    Socket,
    Nginx,
}

impl NodePath {
    /// Every case, in the first run's order.
    pub const ALL: [NodePath; 4] = [Self::Direct, Self::DirectAgent, Self::Socket, Self::Nginx];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (each wrk thread to its own backend)",
            Self::DirectAgent => "direct, lb-agent running (socket mode: nothing on eth0)",
            Self::Socket => "lb socket mode (127.0.0.1:6443, cgroup hooks)",
            Self::Nginx => "nginx (Kubespray's nginx-proxy, 127.0.0.1:6443)",
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::DirectAgent => "direct-agent",
            Self::Socket => "socket",
            Self::Nginx => "nginx",
        }
    }
}

/// The modes measured: keep-alive and one request per connection.
pub const MODES: [Mode; 2] = [Mode::KeepAlive, Mode::Close];

/// One measured wrk run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub case: NodePath,
    pub mode: Mode,
    pub run: usize,
    pub wrk: Wrk,
    /// Whole-machine busy CPU during the run (/proc/stat), ms.
    pub busy_ms: f64,
    /// The CPU of the bench's processes (its cgroup's cpu.stat) during the run, ms.
    pub cgroup_ms: f64,
    /// The ksoftirqd threads' CPU during the run, ms.
    pub ksoftirqd_ms: f64,
    /// cgroup_ms + ksoftirqd_ms per 1000 requests.
    pub cpu_ms_per_1k: f64,
    /// busy_ms per 1000 requests: the end-to-end comparison's CPU figure, which counts
    /// whatever else the machine ran meanwhile.
    pub machine_cpu_ms_per_1k: f64,
    /// cgroup_ms + ksoftirqd_ms as a share of all the machine's CPUs over the run (1 = all
    /// of them): what other work on the machine left to the bench.
    pub cpu_share: f64,
    /// The proxy's own CPU (utime + stime of lb-agent, or of nginx's master and workers;
    /// none for direct) per 1000 requests, ms.
    pub proxy_cpu_ms_per_1k: f64,
    /// SYNs the client had to send again.
    pub syn_retrans: u64,
}

/// Medians of a case and mode over the runs, and their ratios to direct (medians of the
/// run-by-run ratios).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub case: NodePath,
    pub mode: Mode,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_ms_per_1k: f64,
    pub machine_cpu_ms_per_1k: f64,
    pub proxy_cpu_ms_per_1k: f64,
    pub cpu_share: f64,
    /// wrk's errors over all runs.
    pub errors: u64,
    pub syn_retrans: u64,
    pub rps_x_direct: Option<f64>,
    pub p50_x_direct: Option<f64>,
    pub p99_x_direct: Option<f64>,
    pub cpu_x_direct: Option<f64>,
}

/// The configs and commands used, verbatim.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    /// nginx on backend 1 (the others differ in address and names).
    pub backend_nginx: String,
    /// Kubespray's nginx-proxy config as rendered for the lab.
    pub nginx_proxy: String,
    pub nginx_command: String,
    pub lb_agent: String,
    pub agent_command: String,
    /// The direct case's wrk script.
    pub wrk_script: String,
    pub client_sysctls: String,
    pub wrk: Vec<String>,
    pub order: Vec<Vec<NodePath>>,
}

/// Everything the node-local comparison measured.
#[derive(Clone, Debug, Serialize)]
pub struct Socket {
    pub options: E2eOptions,
    pub samples: Vec<Sample>,
    pub summary: Vec<Summary>,
    /// Requests/s of socket over nginx and over direct with the agent running, and
    /// CPU per request of socket over direct-agent: medians of the run-by-run ratios.
    pub ratios: Vec<Ratio>,
    /// lb-agent after the socket runs (largest seen).
    pub agent: Option<Memory>,
    /// Its maps (the kernel's memlock of each, pinned under its pin path).
    pub agent_maps: Vec<MapMem>,
    pub agent_maps_bytes: Option<u64>,
    /// nginx's master and workers, summed, after the nginx runs (largest seen).
    pub nginx: Option<Memory>,
    pub setup: Setup,
    /// Facts checked along the way (what carried the traffic, how it spread).
    pub checks: Vec<String>,
}

impl Socket {
    /// The summary of `case` in `mode`.
    pub fn get(&self, case: NodePath, mode: Mode) -> Option<&Summary> {
        self.summary
            .iter()
            .find(|s| s.case == case && s.mode == mode)
    }

    /// The ratio called `name` in `mode`.
    pub fn ratio(&self, name: &str, mode: Mode) -> Option<f64> {
        self.ratios
            .iter()
            .find(|r| r.name == name && r.mode == mode)
            .and_then(|r| r.value)
    }
}

/// Kubespray's nginx.conf.j2 rendered for the lab: the three backends, the listener on
/// 127.0.0.1:VIP_PORT, `loadbalancer_apiserver_keepalive_timeout` at its default (5m) and
/// the healthcheck server of the sample inventory (8081). Only the first lines are the
/// lab's: the stream module loaded (Debian builds it as a module; the official image
/// Kubespray runs has it built in), nginx in the foreground as the image runs it, and its
/// pid file in the lab's directory.
fn nginx_proxy_conf(backends: &[Ipv4Addr], dir: &Path) -> String {
    let servers: String = backends
        .iter()
        .map(|a| format!("    server {a}:{VIP_PORT};\n"))
        .collect();
    format!(
        "# The lab's: the stream module, the foreground, the pid file.
load_module {NGINX_STREAM_MODULE};
daemon off;
pid {dir}/nginx.pid;

# Kubespray {commit}, {KUBESPRAY_TEMPLATE}:
error_log stderr notice;

worker_processes 2;
worker_rlimit_nofile 65535;
worker_shutdown_timeout 10s;

events {{
  multi_accept on;
  use epoll;
  worker_connections 16384;
}}

stream {{
  upstream kube_apiserver {{
    least_conn;
{servers}  }}

  server {{
    listen        127.0.0.1:{VIP_PORT};
    proxy_pass    kube_apiserver;
    proxy_timeout 10m;
    proxy_connect_timeout 1s;
  }}
}}

http {{
  aio threads;
  aio_write on;
  tcp_nopush on;
  tcp_nodelay on;

  keepalive_timeout 5m;
  keepalive_requests 100;
  reset_timedout_connection on;
  server_tokens off;
  autoindex off;

  server {{
    listen {HEALTHCHECK_PORT};
    location /healthz {{
      access_log off;
      return 200;
    }}
    location /stub_status {{
      stub_status on;
      access_log off;
    }}
  }}
}}
",
        dir = dir.display(),
        commit = &KUBESPRAY_COMMIT[..12],
    )
}

/// wrk's script for the direct case: thread i connects to backend i mod 3.
fn spread_script(backends: &[Ipv4Addr]) -> String {
    let hosts: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "-- Each wrk thread to its own backend, in turn: the load spreads over the backends
-- as the proxies spread it.
local addrs = {{}}
for _, host in ipairs({{ {} }}) do
  table.insert(addrs, wrk.lookup(host, \"{VIP_PORT}\")[1])
end
local n = 0
function setup(thread)
  thread.addr = addrs[n % #addrs + 1]
  n = n + 1
end
",
        hosts.join(", ")
    )
}

/// A case set up; undone when dropped.
enum Active {
    Direct,
    /// lb-agent, for the direct-agent and socket cases.
    Agent(Proc),
    Nginx(Proc),
}

impl Active {
    /// The proxy's processes.
    fn pids(&self) -> Vec<u32> {
        match self {
            Active::Direct => Vec::new(),
            Active::Agent(agent) => agent.pid().into_iter().collect(),
            Active::Nginx(p) => p.pid().map(with_children).unwrap_or_default(),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        match self {
            // SIGTERM: the agent detaches its hooks and removes its pins.
            Active::Agent(agent) => {
                let _ = agent.terminate(Duration::from_secs(10));
            }
            Active::Nginx(p) => {
                let _ = p.terminate(Duration::from_secs(5));
            }
            Active::Direct => {}
        }
    }
}

/// The bench's cgroups: `hooked`, where the socket-mode hooks attach and wrk runs in the
/// socket case, and `plain`, for wrk in the other cases and every other process, both
/// under `all`. Field order is drop order: a cgroup with children cannot be removed.
struct Cgroups {
    hooked: Cgroup,
    plain: Cgroup,
    all: Cgroup,
}

impl Cgroups {
    fn create(lab: &Lab) -> Result<Self> {
        let name = format!("lb-{}-socket", lab.id);
        let all = Cgroup::create(&name).context("creating the bench's cgroup")?;
        Ok(Self {
            hooked: Cgroup::create(&format!("{name}/hooked"))?,
            plain: Cgroup::create(&format!("{name}/plain"))?,
            all,
        })
    }
}

struct Ctx<'a> {
    lab: &'a Lab,
    o: &'a E2eOptions,
    cgroups: &'a Cgroups,
    /// The backends' nginx processes, whose CPU shows how each case spread the load.
    backend_pids: Vec<u32>,
    agent_config: PathBuf,
    nginx_conf: PathBuf,
    nginx_dir: PathBuf,
    script: PathBuf,
    setup: Setup,
    checks: Vec<String>,
    agent: Option<Memory>,
    nginx: Option<Memory>,
    agent_maps: Vec<MapMem>,
}

impl<'a> Ctx<'a> {
    fn url(&self, c: NodePath) -> String {
        match c {
            NodePath::Direct | NodePath::DirectAgent => {
                format!("http://{}:{VIP_PORT}/", self.lab.backends[0].addr)
            }
            _ => format!("http://127.0.0.1:{VIP_PORT}/"),
        }
    }

    /// The words that start wrk (or curl) in the client's namespace for case `c`: in the
    /// hooks' cgroup for the socket case only, in `plain` otherwise. nsenter, not `ip netns
    /// exec`: that remounts /sys, and the cgroup tree with it.
    fn launcher(&self, c: NodePath) -> Vec<String> {
        let mut w = self.lab.client.ns.nsenter_words();
        w.extend(if c == NodePath::Socket {
            self.cgroups.hooked.enter()
        } else {
            self.cgroups.plain.enter()
        });
        w
    }

    fn args(&self, c: NodePath, mode: Mode, d: Duration) -> Vec<String> {
        let direct = matches!(c, NodePath::Direct | NodePath::DirectAgent);
        let script = direct.then_some(self.script.as_path());
        wrk_args(self.o, mode, &self.url(c), d, script)
    }

    fn activate(&mut self, c: NodePath) -> Result<Active> {
        let lab = self.lab;
        flush_time_wait(lab);
        let listening = sh(&lab.client.ns, &format!("ss -Hltn 'sport = :{VIP_PORT}'"))?;
        ensure!(
            listening.trim().is_empty(),
            "something listens on :{VIP_PORT} in the client's namespace before {}: {listening}",
            c.name()
        );
        let active = match c {
            NodePath::Direct => Active::Direct,
            NodePath::DirectAgent | NodePath::Socket => {
                let cfg = self.agent_config.display().to_string();
                let agent = bin("lb-agent").display().to_string();
                let args = [agent.as_str(), "run", "--config", cfg.as_str()];
                self.setup.agent_command = format!(
                    "{} {}",
                    lab.client.ns.nsenter_words().join(" "),
                    args.join(" ")
                );
                // In Active at once: its drop stops the agent by SIGTERM, which detaches.
                let mut active =
                    Active::Agent(lab.spawn_net_only(&lab.client, "agent-client", &args));
                if let Active::Agent(p) = &mut active {
                    if let Some(pid) = p.pid() {
                        self.cgroups.plain.add(pid)?;
                    }
                    lab.wait_backends_up(p, &self.agent_config, Duration::from_secs(30))
                        .map_err(|e| anyhow::anyhow!("{} case: {e}", c.name()))?;
                }
                active
            }
            NodePath::Nginx => {
                ensure!(
                    Path::new(NGINX_STREAM_MODULE).exists(),
                    "{NGINX_STREAM_MODULE} is missing: apt-get install libnginx-mod-stream \
                     (`cargo xtask bench` installs it)"
                );
                let conf = self.nginx_conf.display().to_string();
                let prefix = format!("{}/", self.nginx_dir.display());
                let args = ["nginx", "-c", &conf, "-p", &prefix, "-e", "stderr"];
                self.setup.nginx_command = format!(
                    "{} {}",
                    lab.client.ns.exec_words().join(" "),
                    args.join(" ")
                );
                Active::Nginx(lab.spawn(&lab.client, "nginx-proxy", &args))
            }
        };
        wait_http(&self.launcher(c), &self.url(c), Duration::from_secs(15))
            .with_context(|| format!("setting up the {} case", c.name()))?;
        if let Active::Nginx(_) = active {
            // The master and its workers, up by now.
            for pid in active.pids() {
                self.cgroups.plain.add(pid)?;
            }
        }
        Ok(active)
    }

    fn measure(&mut self, c: NodePath, active: &Active, mode: Mode, run: usize) -> Result<Sample> {
        if mode != Mode::KeepAlive {
            flush_time_wait(self.lab);
        }
        let args = self.args(c, mode, self.o.duration);
        let launcher = self.launcher(c);
        let line = wrk_line(&launcher, &args);
        if !self.setup.wrk.contains(&line) {
            self.setup.wrk.push(line);
        }
        let all = Some(&self.cgroups.all);
        let m = measure_wrk(self.lab, &launcher, &args, &active.pids(), all)
            .with_context(|| format!("{} {}", c.name(), mode.name()))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(Sample {
            case: c,
            mode,
            run,
            cpu_share: (m.cgroup_ms + m.ksoftirqd_ms) / (m.wrk.seconds * 1000.0 * cpus),
            cpu_ms_per_1k: m.per_1k(m.cgroup_ms + m.ksoftirqd_ms),
            machine_cpu_ms_per_1k: m.per_1k(m.busy_ms),
            proxy_cpu_ms_per_1k: m.per_1k(m.procs_ms),
            busy_ms: m.busy_ms,
            cgroup_ms: m.cgroup_ms,
            ksoftirqd_ms: m.ksoftirqd_ms,
            wrk: m.wrk,
            syn_retrans: m.syn_retrans,
        })
    }

    /// After a case's runs: what carried the traffic, how the backends shared it, the
    /// proxy's memory.
    fn check(
        &mut self,
        c: NodePath,
        active: &Active,
        backend_ticks: &[u64],
        run: usize,
    ) -> Result<()> {
        let ticks: Vec<u64> = self
            .backend_pids
            .iter()
            .zip(backend_ticks)
            .map(|(p, t0)| pids_cpu(&[*p]).saturating_sub(*t0))
            .collect();
        let total = ticks.iter().sum::<u64>().max(1) as f64;
        let shares: Vec<String> = ticks
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} {:.0}%", backend_name(i), *t as f64 * 100.0 / total))
            .collect();
        let what = match active {
            Active::Direct => String::new(),
            Active::Agent(_) => {
                let s = self.lab.status(&self.agent_config);
                let connects = s["counters"]["sock_connect"].as_u64().unwrap_or(0);
                let flows: Vec<String> = s["vips"][0]["backends"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .map(|b| {
                                format!("{} {}", b["name"].as_str().unwrap_or("?"), b["new_flows"])
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let link = sh(
                    &self.lab.client.ns,
                    "ip link show eth0 && tc filter show dev eth0 egress",
                )?;
                ensure!(
                    s["vips"][0]["mode"] == "socket"
                        && s["agent"]["socket_hooks"] == true
                        && !link.contains("xdp")
                        && !link.contains(lb_common::PROG_TC_LOCAL),
                    "{}: no socket-mode VIP or hooks, or a program on the client's eth0: \
                     {s}\n{link}",
                    c.name()
                );
                if c == NodePath::DirectAgent {
                    ensure!(
                        connects == 0,
                        "direct-agent: wrk, outside the cgroup, met the hook {connects} times"
                    );
                    "; nothing on the client's eth0, lb_connect4 connected no socket".to_string()
                } else {
                    ensure!(
                        connects > 0,
                        "socket case: the hook connected no socket: {s}"
                    );
                    let m = Memory::of(&active.pids());
                    self.agent = Some(self.agent.map_or(m, |a| a.max(m)));
                    if self.agent_maps.is_empty() {
                        self.agent_maps = map_infos(&self.lab.pin_path(0)).unwrap_or_default();
                    }
                    format!(
                        "; lb_connect4 connected {connects} sockets ({}), nothing listened on \
                         127.0.0.1:{VIP_PORT}",
                        flows.join(", ")
                    )
                }
            }
            Active::Nginx(p) => {
                let pids = active.pids();
                let m = Memory::of(&pids);
                self.nginx = Some(self.nginx.map_or(m, |a| a.max(m)));
                let log = p.output();
                let errors = log.lines().filter(|l| l.contains("[error]")).count();
                ensure!(
                    pids.len() == 3,
                    "nginx: {} processes, not a master and 2 workers:\n{log}",
                    pids.len()
                );
                format!("; nginx: a master and 2 workers, {errors} [error] lines in its log")
            }
        };
        self.checks.push(format!(
            "run {run}: {}: backends' CPU {}{what}",
            c.name(),
            shares.join(", ")
        ));
        Ok(())
    }
}

/// Runs the comparison; `stop` is polled between cases (Ctrl-C), `log` gets progress.
pub fn run(
    lab: &Lab,
    o: &E2eOptions,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<Socket> {
    // Before the backends: dropped after them (a cgroup with processes cannot be removed).
    let cgroups = Cgroups::create(lab)?;
    let (backends, backend_nginx) = start_backends(lab)?;
    for p in &backends {
        if let Some(pid) = p.pid() {
            cgroups.plain.add(pid)?;
        }
    }
    sh(&lab.client.ns, CLIENT_SYSCTLS)?;
    let nginx_dir = lab.dir.join("nginx-proxy");
    fs::create_dir_all(nginx_dir.join("logs"))?;
    let addrs: Vec<Ipv4Addr> = lab.backends.iter().map(|h| h.addr).collect();
    let nginx_proxy = nginx_proxy_conf(&addrs, &nginx_dir);
    let nginx_conf = nginx_dir.join("nginx.conf");
    fs::write(&nginx_conf, &nginx_proxy)?;
    let script = lab.dir.join("spread.lua");
    let wrk_script = spread_script(&addrs);
    fs::write(&script, &wrk_script)?;
    let agent_config = crate::socket_lab::config(
        lab,
        &cgroups.hooked,
        "",
        NGINX_HEALTH,
        &crate::socket_lab::lab_backends(lab),
    );
    let mut c = Ctx {
        lab,
        o,
        cgroups: &cgroups,
        backend_pids: backends.iter().filter_map(Proc::pid).collect(),
        setup: Setup {
            backend_nginx,
            nginx_proxy,
            lb_agent: fs::read_to_string(&agent_config)?,
            wrk_script,
            client_sysctls: CLIENT_SYSCTLS.to_string(),
            ..Default::default()
        },
        agent_config,
        nginx_conf,
        nginx_dir,
        script,
        checks: Vec::new(),
        agent: None,
        nginx: None,
        agent_maps: Vec::new(),
    };
    let mut samples = Vec::new();
    for run in 0..o.runs {
        let mut order = NodePath::ALL.to_vec();
        order.rotate_left(run % NodePath::ALL.len());
        c.setup.order.push(order.clone());
        for case in order {
            if stop() {
                bail!("interrupted");
            }
            // Ctrl-C reaches wrk, nginx and the agent too: say so rather than what failed.
            let interrupted = |e: anyhow::Error| {
                if stop() {
                    anyhow::anyhow!("interrupted")
                } else {
                    e
                }
            };
            let active = c.activate(case).map_err(interrupted)?;
            let _ = wrk(&c.launcher(case), &c.args(case, Mode::KeepAlive, o.warmup))
                .map_err(interrupted)?;
            let ticks: Vec<u64> = c.backend_pids.iter().map(|p| pids_cpu(&[*p])).collect();
            for mode in MODES {
                let s = c.measure(case, &active, mode, run).map_err(interrupted)?;
                log(&format!(
                    "socket run {}: {:<10} {:<10} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  {:>6.1} CPU ms/1k req ({:.1} the proxy's; the bench had {:.0}% of the CPUs){}",
                    run + 1,
                    case.name(),
                    mode.name(),
                    s.wrk.rps,
                    s.wrk.p50_us,
                    s.wrk.p99_us,
                    s.cpu_ms_per_1k,
                    s.proxy_cpu_ms_per_1k,
                    s.cpu_share * 100.0,
                    if s.wrk.errors() > 0 {
                        format!("  ({} errors)", s.wrk.errors())
                    } else {
                        String::new()
                    }
                ));
                samples.push(s);
            }
            c.check(case, &active, &ticks, run + 1)?;
            drop(active);
        }
    }
    drop(backends);
    let agent_maps_bytes =
        (!c.agent_maps.is_empty()).then(|| c.agent_maps.iter().map(|m| m.info.memlock).sum());
    Ok(Socket {
        options: o.clone(),
        summary: summarize(&samples),
        ratios: ratios(&samples),
        samples,
        agent: c.agent,
        agent_maps: c.agent_maps,
        agent_maps_bytes,
        nginx: c.nginx,
        setup: c.setup,
        checks: c.checks,
    })
}

fn series(samples: &[Sample], c: NodePath, m: Mode, f: fn(&Sample) -> f64) -> Vec<f64> {
    stats::series(samples, |s| s.case == c && s.mode == m, |s| s.run, f)
}

/// The ratios besides those to direct.
fn ratios(samples: &[Sample]) -> Vec<Ratio> {
    type Metric = fn(&Sample) -> f64;
    let rps: Metric = |s| s.wrk.rps;
    let cpu: Metric = |s| s.cpu_ms_per_1k;
    let mut v = Vec::new();
    for m in MODES {
        for (name, other, f) in [
            ("socket/nginx", NodePath::Nginx, rps),
            ("socket/direct-agent", NodePath::DirectAgent, rps),
            ("socket/direct-agent CPU", NodePath::DirectAgent, cpu),
        ] {
            v.push(Ratio {
                name: name.into(),
                mode: m,
                value: stats::median_ratio(
                    &series(samples, NodePath::Socket, m, f),
                    &series(samples, other, m, f),
                ),
            });
        }
    }
    v
}

/// Medians and run-by-run ratios to direct.
pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let med = |v: Vec<f64>| stats::median(&v).unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for m in MODES {
        for c in NodePath::ALL {
            let of = |s: &&Sample| s.case == c && s.mode == m;
            if !samples.iter().any(|s| of(&s)) {
                continue;
            }
            let x_direct = |f: fn(&Sample) -> f64| {
                stats::median_ratio(
                    &series(samples, c, m, f),
                    &series(samples, NodePath::Direct, m, f),
                )
            };
            out.push(Summary {
                case: c,
                mode: m,
                rps: med(series(samples, c, m, |s| s.wrk.rps)),
                p50_us: med(series(samples, c, m, |s| s.wrk.p50_us)),
                p99_us: med(series(samples, c, m, |s| s.wrk.p99_us)),
                cpu_ms_per_1k: med(series(samples, c, m, |s| s.cpu_ms_per_1k)),
                machine_cpu_ms_per_1k: med(series(samples, c, m, |s| s.machine_cpu_ms_per_1k)),
                cpu_share: med(series(samples, c, m, |s| s.cpu_share)),
                proxy_cpu_ms_per_1k: med(series(samples, c, m, |s| s.proxy_cpu_ms_per_1k)),
                errors: samples.iter().filter(of).map(|s| s.wrk.errors()).sum(),
                syn_retrans: samples.iter().filter(of).map(|s| s.syn_retrans).sum(),
                rps_x_direct: x_direct(|s| s.wrk.rps),
                p50_x_direct: x_direct(|s| s.wrk.p50_us),
                p99_x_direct: x_direct(|s| s.wrk.p99_us),
                cpu_x_direct: x_direct(|s| s.cpu_ms_per_1k),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(case: NodePath, mode: Mode, run: usize, rps: f64, p50: f64, cpu: f64) -> Sample {
        Sample {
            case,
            mode,
            run,
            wrk: Wrk {
                rps,
                requests: rps as u64 * 10,
                p50_us: p50,
                p99_us: 10.0 * p50,
                ..Default::default()
            },
            busy_ms: 0.0,
            cgroup_ms: 0.0,
            ksoftirqd_ms: 0.0,
            cpu_ms_per_1k: cpu,
            machine_cpu_ms_per_1k: cpu,
            cpu_share: 1.0,
            proxy_cpu_ms_per_1k: if case == NodePath::Nginx {
                cpu / 2.0
            } else {
                0.0
            },
            syn_retrans: 0,
        }
    }

    #[test]
    fn ratios_to_direct_are_run_by_run() {
        let mut s = Vec::new();
        for (run, (d, so, n)) in [
            (100.0, 99.0, 50.0),
            (200.0, 190.0, 80.0),
            (150.0, 150.0, 75.0),
        ]
        .into_iter()
        .enumerate()
        {
            s.push(sample(
                NodePath::Direct,
                Mode::KeepAlive,
                run,
                d,
                100.0,
                10.0,
            ));
            s.push(sample(
                NodePath::Socket,
                Mode::KeepAlive,
                run,
                so,
                101.0,
                10.0 + run as f64,
            ));
            s.push(sample(
                NodePath::Nginx,
                Mode::KeepAlive,
                run,
                n,
                200.0,
                20.0,
            ));
        }
        let sum = summarize(&s);
        assert_eq!(sum.len(), 3, "no close samples, no close rows");
        let get = |c| sum.iter().find(|x| x.case == c).unwrap();
        // socket/direct run by run: 0.99, 0.95, 1.0.
        assert_eq!(get(NodePath::Socket).rps_x_direct, Some(0.99));
        assert_eq!(get(NodePath::Socket).rps, 150.0);
        assert_eq!(get(NodePath::Socket).cpu_x_direct, Some(1.1));
        assert_eq!(get(NodePath::Nginx).rps_x_direct, Some(0.5));
        assert_eq!(get(NodePath::Nginx).p99_x_direct, Some(2.0));
        assert_eq!(get(NodePath::Nginx).proxy_cpu_ms_per_1k, 10.0);
        assert_eq!(get(NodePath::Direct).rps_x_direct, Some(1.0));
        let r = ratios(&s);
        let r = |n: &str| {
            r.iter()
                .find(|r| r.name == n && r.mode == Mode::KeepAlive)
                .unwrap()
                .value
        };
        // socket/nginx: 1.98, 2.375, 2.
        assert_eq!(r("socket/nginx"), Some(2.0));
        assert_eq!(r("socket/direct-agent"), None, "no direct-agent samples");
    }

    #[test]
    fn kubespray_config_and_wrk_script() {
        let addrs: Vec<Ipv4Addr> = (0..3).map(crate::lab::backend_addr).collect();
        let conf = nginx_proxy_conf(&addrs, Path::new("/tmp/x"));
        assert!(
            conf.contains("least_conn;\n    server 198.18.0.11:6443;\n"),
            "{conf}"
        );
        assert!(conf.contains("listen        127.0.0.1:6443;"), "{conf}");
        assert!(conf.starts_with("# The lab's"), "{conf}");
        let lua = spread_script(&addrs);
        assert!(
            lua.contains("\"198.18.0.11\", \"198.18.0.12\", \"198.18.0.13\""),
            "{lua}"
        );
    }
}
