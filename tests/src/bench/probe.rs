//! What health probing costs the agent: its CPU (utime + stime from /proc/PID/stat) over a
//! window, as a share of one core, probing HTTPS /readyz of lb-stub apiservers: three every
//! 200 ms, and a hundred (one lb-stub listening on 100 ports) every second.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{load::clk_tck, parse};
use crate::lab::{bin, wait_for, Lab, Proc, STUB_ADMIN, VIP_PORT};

/// How long to measure.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeOptions {
    /// The measured window.
    pub window: Duration,
    /// Time after the backends are up and before the window opens.
    pub settle: Duration,
}

impl ProbeOptions {
    /// What `cargo xtask bench` measures.
    pub fn full() -> Self {
        Self {
            window: Duration::from_secs(30),
            settle: Duration::from_secs(3),
        }
    }

    /// `--quick`: the shortest window the issue allows.
    pub fn quick() -> Self {
        Self {
            window: Duration::from_secs(20),
            settle: Duration::from_secs(2),
        }
    }
}

/// The agent's cost at one probing load.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeCost {
    pub backends: usize,
    pub interval_ms: u64,
    pub window_s: f64,
    /// utime + stime over the window, clock ticks.
    pub cpu_ticks: u64,
    /// CPU as % of one core.
    pub cpu_pct: f64,
    /// The target, % of one core.
    pub target_pct: f64,
    /// /readyz requests the stubs served in the window.
    pub probes: u64,
    pub rss_kib: Option<u64>,
    /// The agent config used.
    pub config: String,
}

fn states_up(lab: &Lab, config: &Path) -> usize {
    let s = lab.status(config);
    s["vips"][0]["backends"]
        .as_array()
        .map(|b| b.iter().filter(|b| b["state"] == "up").count())
        .unwrap_or(0)
}

fn readyz(lab: &Lab, stubs: &[usize]) -> u64 {
    stubs
        .iter()
        .map(|i| {
            lab.stub_stats(*i)["requests"]["/readyz"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum()
}

fn pid_ticks(pid: u32) -> Result<u64> {
    parse::pid_stat_cpu(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

#[allow(clippy::too_many_arguments)]
fn measure(
    lab: &Lab,
    o: &ProbeOptions,
    config: &Path,
    backends: usize,
    interval: Duration,
    target_pct: f64,
    stubs: &[usize],
    stop: &dyn Fn() -> bool,
) -> Result<ProbeCost> {
    let mut agent = lab.start_agent(0, config);
    let pid = agent.pid().context("agent pid")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while states_up(lab, config) < backends {
        if Instant::now() > deadline {
            bail!(
                "only {} of {backends} backends came up:\n{}",
                states_up(lab, config),
                agent.output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(o.settle);
    let (t0, p0, i0) = (pid_ticks(pid)?, readyz(lab, stubs), Instant::now());
    while i0.elapsed() < o.window {
        if stop() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (t1, p1, secs) = (
        pid_ticks(pid)?,
        readyz(lab, stubs),
        i0.elapsed().as_secs_f64(),
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let up = states_up(lab, config);
    let _ = agent.terminate(Duration::from_secs(10));
    if up < backends {
        bail!("{} of {backends} backends up at the end of the window", up);
    }
    let ticks = t1 - t0;
    Ok(ProbeCost {
        backends,
        interval_ms: interval.as_millis() as u64,
        window_s: secs,
        cpu_ticks: ticks,
        cpu_pct: ticks as f64 / clk_tck() / secs * 100.0,
        target_pct,
        probes: p1 - p0,
        rss_kib: parse::status_kib(&status, "VmRSS"),
        config: fs::read_to_string(config)?,
    })
}

/// One lb-stub on backend `i` listening on `ports` (its admin port as usual).
fn start_multi_stub(lab: &Lab, i: usize, ports: std::ops::Range<u16>) -> Result<Proc> {
    let pki = lab.dir.join("pki");
    let h = &lab.backends[i];
    let stub = bin("lb-stub");
    let mut args: Vec<String> = vec![
        stub.display().to_string(),
        "serve".into(),
        "--name".into(),
        "bench-100".into(),
        "--cert".into(),
        pki.join("server.crt").display().to_string(),
        "--key".into(),
        pki.join("server.key").display().to_string(),
        "--admin-listen".into(),
        STUB_ADMIN.into(),
    ];
    for p in ports {
        args.push("--listen".into());
        args.push(format!("{}:{p}", h.addr));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = lab.spawn(h, "stub-100", &argv);
    wait_for(Duration::from_secs(10), "the 100-port stub", || {
        h.ns.try_sh(&format!("curl -sf --max-time 2 http://{STUB_ADMIN}/stats"))
            .is_ok()
    });
    Ok(p)
}

/// Measures both loads. Needs a lab with one LB and three backends and nothing listening
/// on the backends' :6443.
pub fn run(
    lab: &Lab,
    o: &ProbeOptions,
    stop: &dyn Fn() -> bool,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<ProbeCost>> {
    let mut out = Vec::new();
    let mut stubs = lab.start_stubs();
    let config = lab.agent_config(0, "", "interval = \"200ms\"");
    let c = measure(
        lab,
        o,
        &config,
        3,
        Duration::from_millis(200),
        1.0,
        &[0, 1, 2],
        stop,
    )?;
    log(&format!(
        "probe: 3 backends every 200 ms: {:.2}% of a core ({} probes in {:.0} s)",
        c.cpu_pct, c.probes, c.window_s
    ));
    out.push(c);

    // The stub on backend 0 makes way for one serving 100 ports.
    drop(stubs.remove(0));
    drop(stubs);
    let n = 100u16;
    let _multi = start_multi_stub(lab, 0, VIP_PORT..VIP_PORT + n)?;
    let addr: Ipv4Addr = lab.backends[0].addr;
    let backends: Vec<(String, Ipv4Addr, u16)> = (0..n)
        .map(|i| (format!("apiserver{:03}", i + 1), addr, VIP_PORT + i))
        .collect();
    let config = lab.agent_config_backends(0, "", "interval = \"1s\"", &backends);
    let c = measure(
        lab,
        o,
        &config,
        n as usize,
        Duration::from_secs(1),
        5.0,
        &[0],
        stop,
    )?;
    log(&format!(
        "probe: 100 backends every 1 s: {:.2}% of a core ({} probes in {:.0} s)",
        c.cpu_pct, c.probes, c.window_s
    ));
    out.push(c);
    Ok(out)
}
