//! What the end-to-end parts of the bench share: nginx on the backends, wrk in the client's
//! namespace (its command lines, its runs), the client's sysctls, TIME_WAIT flushing, the
//! machine's and a process's CPU clocks and memory.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    e2e::{E2eOptions, Mode},
    parse::{self, CpuTicks, Wrk},
};
use crate::{
    cgroup::Cgroup,
    lab::{backend_name, Lab, Proc, VIP_PORT},
    netns::Netns,
};

/// Clock ticks per second (/proc/stat and /proc/PID/stat count in these).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The whole machine's CPU ticks now.
pub fn cpu_now() -> Result<CpuTicks> {
    parse::proc_stat(&fs::read_to_string("/proc/stat")?)
}

/// utime + stime of processes `pids` (those still there), clock ticks.
pub fn pids_cpu(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|t| parse::pid_stat_cpu(&t).ok())
        .sum()
}

/// The kernel's softirq threads (ksoftirqd/N): network work they take over from the
/// processes that raised it is charged to them, not to those processes.
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// `pid` and its children (nginx's master and workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    v.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    v
}

/// Memory of a group of processes, KiB, summed over them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// VmRSS: pages shared between the processes (nginx's workers share their master's)
    /// count once per process.
    pub rss_kib: u64,
    /// Pss (/proc/PID/smaps_rollup): each shared page split between its sharers.
    pub pss_kib: u64,
    /// VmHWM: each process's peak resident memory.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads the memory of `pids` now.
    pub fn of(pids: &[u32]) -> Self {
        let mut m = Self::default();
        for p in pids {
            let st = fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let sm = fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
            m.rss_kib += parse::status_kib(&st, "VmRSS").unwrap_or(0);
            m.hwm_kib += parse::status_kib(&st, "VmHWM").unwrap_or(0);
            m.pss_kib += parse::status_kib(&sm, "Pss").unwrap_or(0);
        }
        m
    }

    /// The larger of each figure.
    pub fn max(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.max(o.rss_kib),
            pss_kib: self.pss_kib.max(o.pss_kib),
            hwm_kib: self.hwm_kib.max(o.hwm_kib),
        }
    }
}

/// nginx for backend `i`: one process, plain HTTP on :6443, /healthz for HAProxy's check.
fn nginx_conf(lab: &Lab, i: usize) -> String {
    let name = backend_name(i);
    format!(
        "# one process: the lab has two cores for client, LB and three backends
master_process off;
daemon off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        # every address: the DSR paths deliver packets addressed to the VIP
        listen {VIP_PORT} backlog=4096;
        location = /healthz {{ default_type text/plain; return 200 \"ok\\n\"; }}
        location / {{ default_type text/plain; return 200 \"ok\\n\"; }}
    }}
}}
",
        dir = lab.dir.display(),
    )
}

/// lb-agent's `[vip.health]` for the nginx backends: plain HTTP, their /healthz.
pub const NGINX_HEALTH: &str = "kind = \"http\"\npath = \"/healthz\"\ninterval = \"2s\"";

/// Starts nginx on every backend and waits until each answers; returns the processes and
/// backend 1's config.
pub fn start_backends(lab: &Lab) -> Result<(Vec<Proc>, String)> {
    let mut procs = Vec::new();
    let mut first = String::new();
    for i in 0..lab.backends.len() {
        let conf = nginx_conf(lab, i);
        if i == 0 {
            first = conf.clone();
        }
        let path = lab.dir.join(format!("nginx-{}.conf", backend_name(i)));
        fs::write(&path, conf)?;
        let err = lab.dir.join(format!("nginx-{}.log", backend_name(i)));
        procs.push(lab.spawn(
            &lab.backends[i],
            &format!("nginx-{}", backend_name(i)),
            &[
                "nginx",
                "-c",
                path.to_str().context("path")?,
                "-e",
                err.to_str().context("path")?,
                "-p",
                lab.dir.to_str().context("path")?,
            ],
        ));
    }
    let client = lab.client.ns.exec_words();
    for h in &lab.backends {
        wait_http(
            &client,
            &format!("http://{}:{VIP_PORT}/healthz", h.addr),
            Duration::from_secs(10),
        )
        .context("nginx on a backend")?;
    }
    Ok((procs, first))
}

/// The client is only the load generator: more ports, and reuse of its own TIME_WAIT
/// tuples, so that wrk's connect() is not what limits the close runs.
pub const CLIENT_SYSCTLS: &str =
    "sysctl -qw net.ipv4.ip_local_port_range='1024 65535' net.ipv4.tcp_tw_reuse=1";

/// Runs `cmd` with sh in `ns`.
pub fn sh(ns: &Netns, cmd: &str) -> Result<String> {
    ns.try_sh(cmd)
        .map_err(|e| anyhow::anyhow!("in {}: `{cmd}`: {e}", ns.name))
}

/// `words` as a Command.
fn command(words: &[String]) -> Command {
    let mut c = Command::new(&words[0]);
    c.args(&words[1..]);
    c
}

/// Polls until `url` answers 200 to curl started by `launcher` (words that run a command in
/// the client's namespace, e.g. [`Netns::exec_words`]).
pub fn wait_http(launcher: &[String], url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = command(launcher)
            .args(["curl", "-sf", "-o", "/dev/null", "--max-time", "1", url])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} does not answer from the client");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// wrk's arguments: `o`'s threads and connections for `d`, `Connection: close` unless
/// keep-alive, a Lua `script` if given.
pub fn wrk_args(
    o: &E2eOptions,
    mode: Mode,
    url: &str,
    d: Duration,
    script: Option<&Path>,
) -> Vec<String> {
    let mut a = vec![
        format!("-t{}", o.threads),
        format!("-c{}", o.connections),
        format!("-d{}s", d.as_secs().max(1)),
        "--latency".to_string(),
    ];
    if mode != Mode::KeepAlive {
        a.push("-H".into());
        a.push("Connection: close".into());
    }
    if let Some(s) = script {
        a.push("-s".into());
        a.push(s.display().to_string());
    }
    a.push(url.to_string());
    a
}

/// A command line as the report shows it.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// wrk's full command line, started by `launcher`.
pub fn wrk_line(launcher: &[String], args: &[String]) -> String {
    format!("{} wrk {}", shell_words(launcher), shell_words(args))
}

/// Runs wrk by `launcher` and parses its report.
pub fn wrk(launcher: &[String], args: &[String]) -> Result<Wrk> {
    let out = command(launcher)
        .arg("wrk")
        .args(args)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk {} failed: {}{}",
        shell_words(args),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    parse::wrk(&text)
}

/// One wrk run and what it cost.
#[derive(Clone, Debug)]
pub struct Measured {
    pub wrk: Wrk,
    /// Whole-machine busy CPU over the run (/proc/stat), ms.
    pub busy_ms: f64,
    /// utime + stime of the processes watched over the run, ms.
    pub procs_ms: f64,
    /// CPU of the cgroup watched (every process in it and below it) over the run, ms.
    pub cgroup_ms: f64,
    /// utime + stime of the ksoftirqd threads over the run, ms.
    pub ksoftirqd_ms: f64,
    /// SYNs the client had to send again (TcpExt TCPSynRetrans).
    pub syn_retrans: u64,
    /// SYNs the backends dropped on a TIME_WAIT tuple for an older timestamp (TcpExt
    /// PAWSTimewait).
    pub paws_timewait: u64,
}

impl Measured {
    /// `ms` per 1000 of the run's requests.
    pub fn per_1k(&self, ms: f64) -> f64 {
        ms / (self.wrk.requests as f64 / 1000.0)
    }
}

/// Runs wrk (see [`wrk`]) and measures over it the machine's CPU, the CPU of processes
/// `procs`, of `cgroup` if given, and of the ksoftirqd threads, the client's SYN
/// retransmits and the backends' PAWS drops; fails when no request completed.
pub fn measure_wrk(
    lab: &Lab,
    launcher: &[String],
    args: &[String],
    procs: &[u32],
    cgroup: Option<&Cgroup>,
) -> Result<Measured> {
    let backends: Vec<&Netns> = lab.backends.iter().map(|h| &h.ns).collect();
    let (syn0, paws0) = (
        net_counter(&[&lab.client.ns], SYN_RETRANS),
        net_counter(&backends, PAWS_TW),
    );
    let softirqd = ksoftirqd_pids();
    let cg = || cgroup.map(Cgroup::usage_usec).unwrap_or(0);
    let (before, procs0, cg0, sirq0) = (cpu_now()?, pids_cpu(procs), cg(), pids_cpu(&softirqd));
    let w = wrk(launcher, args)?;
    let (after, procs1, cg1, sirq1) = (cpu_now()?, pids_cpu(procs), cg(), pids_cpu(&softirqd));
    let (syn1, paws1) = (
        net_counter(&[&lab.client.ns], SYN_RETRANS),
        net_counter(&backends, PAWS_TW),
    );
    ensure!(
        w.requests > 0,
        "no request completed: {}",
        wrk_line(launcher, args)
    );
    let ms = |ticks: u64| ticks as f64 * 1000.0 / clk_tck();
    Ok(Measured {
        wrk: w,
        busy_ms: ms(after.busy_since(&before)),
        procs_ms: ms(procs1.saturating_sub(procs0)),
        cgroup_ms: cg1.saturating_sub(cg0) as f64 / 1000.0,
        ksoftirqd_ms: ms(sirq1.saturating_sub(sirq0)),
        syn_retrans: syn1.saturating_sub(syn0),
        paws_timewait: paws1.saturating_sub(paws0),
    })
}

/// Whoever closes first keeps the tuple in TIME_WAIT for 60 s: wrk closes as soon as it has
/// the response, the backends close after it, a proxy in between. The source ports of the
/// proxies and the client overlap, so without this a path would pay for what the path
/// before it left behind (slow connect() on a client short of ports, SYNs dropped by PAWS
/// on a backend). Called before a path is set up and before each close run; within a run
/// it accumulates, as it would in production.
pub fn flush_time_wait(lab: &Lab) {
    for h in lab.backends.iter().chain(&lab.lbs).chain([&lab.client]) {
        let _ = h.ns.try_sh("ss -K state time-wait >/dev/null 2>&1");
    }
}

/// SYNs the client had to send again.
pub const SYN_RETRANS: &str = "TcpExt:TCPSynRetrans";
/// SYNs dropped on a TIME_WAIT tuple for an older timestamp.
pub const PAWS_TW: &str = "TcpExt:PAWSTimewait";

/// A TCP counter summed over namespaces (absent counters count 0).
pub fn net_counter(nss: &[&Netns], name: &str) -> u64 {
    nss.iter()
        .filter_map(|ns| ns.try_sh("cat /proc/net/netstat /proc/net/snmp").ok())
        .map(|t| parse::net_counters(&t).get(name).copied().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_command_lines() {
        let o = E2eOptions::full();
        let a = wrk_args(
            &o,
            Mode::Close,
            "http://198.18.0.100:6443/",
            o.duration,
            None,
        );
        assert_eq!(
            shell_words(&a),
            "-t2 -c32 -d10s --latency -H 'Connection: close' http://198.18.0.100:6443/"
        );
        let a = wrk_args(
            &o,
            Mode::CloseFirstSecond,
            "http://x/",
            Duration::from_secs(1),
            None,
        );
        assert_eq!(
            shell_words(&a),
            "-t2 -c32 -d1s --latency -H 'Connection: close' http://x/"
        );
        let a = wrk_args(
            &o,
            Mode::KeepAlive,
            "http://x/",
            Duration::from_millis(300),
            Some(Path::new("/tmp/t.lua")),
        );
        assert_eq!(
            shell_words(&a),
            "-t2 -c32 -d1s --latency -s /tmp/t.lua http://x/"
        );
        let ns = Netns::borrowed("lb-x-client");
        assert_eq!(
            wrk_line(&ns.exec_words(), &a[..2]),
            "ip netns exec lb-x-client wrk -t2 -c32"
        );
    }

    #[test]
    fn softirq_threads() {
        // One per CPU, on every Linux.
        assert!(!ksoftirqd_pids().is_empty());
    }

    #[test]
    fn memory_of_this_process() {
        let m = Memory::of(&[std::process::id()]);
        assert!(
            m.rss_kib > 0 && m.hwm_kib >= m.rss_kib && m.pss_kib > 0,
            "{m:?}"
        );
        let twice = Memory::of(&[std::process::id(), std::process::id()]);
        assert!(twice.rss_kib > m.rss_kib, "{twice:?}");
        assert_eq!(m.max(Memory::default()), m);
    }
}
