//! The report: results as JSON (target/bench/results.json) and as Markdown
//! (docs/benchmarks.md), and where lb stands against the issue's targets.

use std::{fs, process::Command};

use serde::Serialize;

use super::{
    e2e::{E2e, Mode, PathKind},
    failover::{Failover, Stack, Stop, Variant},
    micro::{Case, Micro, Point, BASE_BACKENDS, BASE_FLOWS, FULL_TABLE_FLOWS},
    probe::ProbeCost,
    socket::{self, NodePath, Socket, KUBESPRAY_COMMIT, KUBESPRAY_TEMPLATE},
};

/// The machine and the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Env {
    /// UTC, RFC 3339.
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_mib: u64,
    /// `git describe --always --dirty` of the checkout, when there is one.
    pub git: Option<String>,
    pub quick: bool,
    /// The command that produced the report.
    pub command: String,
    /// Versions of the tools compared.
    pub tools: Vec<(String, String)>,
    /// /proc/loadavg when the run began.
    pub loadavg: String,
    /// Network namespaces of other labs or tests found when the run began: something else
    /// was using the machine's two cores.
    pub other_namespaces: Vec<String>,
}

/// One of the issue's targets and where lb stands.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: Option<f64>,
    pub unit: String,
    pub met: Option<bool>,
}

/// Everything one `lb-bench` run produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub env: Env,
    pub micro: Option<Micro>,
    pub e2e: Option<E2e>,
    /// Failover: lb against keepalived + HAProxy; None: not measured.
    pub failover: Option<Failover>,
    pub probe: Vec<ProbeCost>,
    /// Node-local: the socket mode against Kubespray's nginx-proxy; None: not measured.
    pub socket: Option<Socket>,
    pub targets: Vec<Target>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// Describes this machine and run.
pub fn env(quick: bool) -> Env {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| super::parse::status_kib(&m, "MemTotal"))
        .unwrap_or(0)
        / 1024;
    let git = Some(first_line("git", &["describe", "--always", "--dirty"]))
        .filter(|s| !s.is_empty() && !s.starts_with("fatal"));
    Env {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpu,
        cores,
        memory_mib,
        git,
        quick,
        command: if quick {
            "cargo xtask bench --quick".into()
        } else {
            "cargo xtask bench".into()
        },
        tools: [
            ("haproxy", first_line("haproxy", &["-v"])),
            ("nginx", first_line("nginx", &["-v"])),
            ("wrk", first_line("wrk", &["--version"])),
            ("nft", first_line("nft", &["--version"])),
            ("keepalived", first_line("keepalived", &["--version"])),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect(),
        loadavg: fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        other_namespaces: crate::netns::list()
            .into_iter()
            .filter(|n| n.starts_with("lb-") || n.starts_with("lbt-"))
            .collect(),
    }
}

fn target(
    what: &str,
    target: &str,
    measured: Option<f64>,
    unit: &str,
    ok: fn(f64) -> bool,
) -> Target {
    Target {
        what: what.into(),
        target: target.into(),
        measured,
        unit: unit.into(),
        met: measured.map(ok),
    }
}

/// The issue's targets, from what was measured.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(e) = &r.e2e {
        t.push(target(
            "lb req/s (keep-alive) over HAProxy's",
            ">= 1.5x",
            e.ratio("lb/haproxy", Mode::KeepAlive),
            "x",
            |v| v >= 1.5,
        ));
        t.push(target(
            "lb new connections/s over HAProxy's",
            ">= 1.25x",
            e.ratio("lb/haproxy", Mode::Close),
            "x",
            |v| v >= 1.25,
        ));
        t.push(target(
            "lb req/s (keep-alive) over nftables'",
            ">= 1x",
            e.ratio("lb/nftables", Mode::KeepAlive),
            "x",
            |v| v >= 1.0,
        ));
        t.push(target(
            "lb new connections/s over nftables'",
            ">= 1x",
            e.ratio("lb/nftables", Mode::Close),
            "x",
            |v| v >= 1.0,
        ));
        t.push(target(
            "lb CPU overhead over direct / HAProxy's (keep-alive)",
            "<= 0.25",
            e.ratio("lb overhead/haproxy overhead", Mode::KeepAlive),
            "",
            |v| v <= 0.25,
        ));
        t.push(target(
            "lb CPU overhead over direct / HAProxy's (close)",
            "<= 0.25",
            e.ratio("lb overhead/haproxy overhead", Mode::Close),
            "",
            |v| v <= 0.25,
        ));
    }
    if let Some(m) = &r.micro {
        // Issue 10's targets for data plane v1: each case at most this many times the floor.
        type Bound = fn(f64) -> bool;
        let cases: [(&str, &str, &Case, Bound); 4] = [
            ("established-flow packet", "<= 4x", &m.established, |v| {
                v <= 4.0
            }),
            ("backend's reply", "<= 4x", &m.reply, |v| v <= 4.0),
            ("packet not for lb", "<= 2x", &m.not_ours, |v| v <= 2.0),
            ("SYN creating a flow", "<= 20x", &m.syn, |v| v <= 20.0),
        ];
        for (what, want, case, ok) in cases {
            t.push(target(
                &format!("{what} over the XDP_PASS floor"),
                want,
                Some(case.x_floor),
                "x",
                ok,
            ));
        }
        let at = |flows: u32| {
            m.by_flows
                .iter()
                .find(|p| p.flows == flows)
                .map(|p| p.established.ns)
        };
        t.push(target(
            "established packet at 262,144 flows over at 10",
            "<= 1.10x",
            at(FULL_TABLE_FLOWS).zip(at(BASE_FLOWS)).map(|(a, b)| a / b),
            "x",
            |v| v <= 1.10,
        ));
    }
    for p in &r.probe {
        let ok: fn(f64) -> bool = if p.target_pct <= 1.0 {
            |v| v < 1.0
        } else {
            |v| v < 5.0
        };
        t.push(target(
            &format!(
                "agent CPU probing {} backends every {} ms (HTTPS)",
                p.backends, p.interval_ms
            ),
            &format!("< {}% of a core", p.target_pct),
            Some(p.cpu_pct),
            "%",
            ok,
        ));
    }
    t
}

fn x(v: f64) -> String {
    format!("{v:.2}x")
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a".into())
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn mib(b: f64) -> String {
    if b < 1048576.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / 1048576.0)
    }
}

/// The kernel's name of a BPF map type (enum bpf_map_type).
fn map_type(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu hash".into(),
        6 => "percpu array".into(),
        9 => "LRU hash".into(),
        10 => "LRU percpu hash".into(),
        _ => t.to_string(),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The targets as a Markdown table (also printed at the end of a run).
pub fn targets_table(t: &[Target]) -> String {
    let mut s = String::from("| target | wanted | measured | |\n|---|---|---|---|\n");
    for t in t {
        let m = match (t.measured, t.unit.as_str()) {
            (Some(v), "%") => format!("{v:.2}%"),
            (Some(v), "x") => x(v),
            (Some(v), _) => format!("{v:.2}"),
            (None, _) => "n/a".into(),
        };
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        s.push_str(&format!("| {} | {} | {m} | {met} |\n", t.what, t.target));
    }
    s
}

/// The microbenchmark's main table (also printed).
pub fn micro_table(m: &Micro) -> String {
    let mut s = String::from("| packet | ns per packet | x XDP_PASS floor |\n|---|---:|---:|\n");
    for c in [&m.floor, &m.not_ours, &m.syn, &m.established, &m.reply] {
        s.push_str(&format!(
            "| {} | {:.1} | {} |\n",
            c.name,
            c.ns,
            x(c.x_floor)
        ));
    }
    s
}

fn scale_table(head: &str, points: &[Point], key: fn(&Point) -> String) -> String {
    let mut s = format!(
        "| {head} | SYN creating a flow, ns | x floor | established flow, ns | x floor |\n|---|---:|---:|---:|---:|\n"
    );
    for p in points {
        s.push_str(&format!(
            "| {} | {:.1} | {} | {:.1} | {} |\n",
            key(p),
            p.syn.ns,
            x(p.syn.x_floor),
            p.established.ns,
            x(p.established.x_floor)
        ));
    }
    s
}

/// The end-to-end table of one mode (also printed).
pub fn e2e_table(e: &E2e, mode: Mode) -> String {
    let what = match mode {
        Mode::KeepAlive => "requests/s",
        Mode::CloseFirstSecond | Mode::Close => "new connections/s",
    };
    let mut s = format!(
        "| path | {what} | p50 | p99 | CPU ms per 1000 req | CPU over direct | SYN retransmits | wrk errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for p in PathKind::ALL {
        let Some(v) = e.get(p, mode) else { continue };
        let over = if p == PathKind::Direct {
            "-".to_string()
        } else {
            opt(e.overhead(p, mode), |v| format!("{v:+.2} ms"))
        };
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.2} | {over} | {} | {} |\n",
            p.label(),
            v.rps,
            us(v.p50_us),
            us(v.p99_us),
            v.cpu_ms_per_1k,
            if v.paws_timewait > 0 {
                format!("{} ({} PAWS)", v.syn_retrans, v.paws_timewait)
            } else {
                v.syn_retrans.to_string()
            },
            v.errors
        ));
    }
    s
}

/// The ratios of the end-to-end comparison (also printed).
pub fn ratio_table(e: &E2e) -> String {
    let mut s = String::from(
        "| ratio | keep-alive (req/s) | close (conn/s) | close, first second (conn/s) |\n\
         |---|---:|---:|---:|\n",
    );
    let two = |v: f64| format!("{v:.2}");
    let row = |s: &mut String, label: &str, name: &str, f: fn(f64) -> String| {
        s.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            opt(e.ratio(name, Mode::KeepAlive), f),
            opt(e.ratio(name, Mode::Close), f),
            opt(e.ratio(name, Mode::CloseFirstSecond), f)
        ));
    };
    for name in [
        "lb/direct",
        "lb/haproxy",
        "lb/nftables",
        "lb-dsr-l2/direct",
        "lb-dsr-l2/lb",
        "lb-dsr-l2/haproxy",
        "lb-dsr-ipip/direct",
        "lb-dsr-ipip/lb",
        "lb-dsr-ipip/haproxy",
    ] {
        row(&mut s, name, name, x);
    }
    row(
        &mut s,
        "lb's CPU overhead / HAProxy's",
        "lb overhead/haproxy overhead",
        two,
    );
    s
}

fn case_line(c: &Case) -> String {
    format!("{} calls: {}", c.calls_ns.len(), c.checked)
}

fn code(lang: &str, body: &str) -> String {
    format!("```{lang}\n{}\n```\n", body.trim_end())
}

/// docs/benchmarks.md.
pub fn markdown(r: &Results) -> String {
    let e = &r.env;
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(&format!(
        "Generated by `{}` on {} (this file is rewritten by each run; the raw figures are in \
         `target/bench/results.json`).\n\n\
         Machine: {} cores of {}, {} MiB, Linux {}; lb {}.{}\n\n",
        e.command,
        e.date,
        e.cores,
        e.cpu,
        e.memory_mib,
        e.kernel,
        e.git.as_deref().unwrap_or("(no git checkout)"),
        if e.quick {
            " **Quick run** (`--quick`): shorter runs, so noisier figures than `cargo xtask bench`."
        } else {
            ""
        }
    ));
    if !e.other_namespaces.is_empty() {
        s.push_str(&format!(
            "**Other work shared the machine during this run** (load average {} at the \
             start; namespaces of other labs or tests: {}): the figures are noisier than \
             usual, the ratios less so since every path saw the same disturbance in turn.\n\n",
            e.loadavg,
            e.other_namespaces.join(", ")
        ));
    }
    s.push_str(
        "Every comparison is measured side by side in the same run on the same machine, and \
         every figure is the median of the runs; read the ratios, not the absolute numbers, \
         which belong to this small VM.\n\n",
    );
    s.push_str("## Where lb stands\n\n");
    s.push_str(&targets_table(&r.targets));
    s.push('\n');

    if let Some(m) = &r.micro {
        s.push_str("## 1. The XDP program, per packet\n\n");
        s.push_str(&format!(
            "BPF_PROG_TEST_RUN with `repeat` = {} ({} calls per case, median of the kernel's \
             mean per run), {BASE_BACKENDS} backends, {BASE_FLOWS} other flows in the table. \
             The floor is `lb_xdp_pass` of the same object on the same frame.\n\n",
            thousands(m.options.repeat as u64),
            m.options.calls
        ));
        s.push_str(&micro_table(m));
        s.push_str(&format!(
            "\nWhat the program's own counters confirmed for each case: floor: {}; not for a \
             VIP: {}; SYN: {}; established: {}; reply: {}.\n\n",
            case_line(&m.floor),
            case_line(&m.not_ours),
            case_line(&m.syn),
            case_line(&m.established),
            case_line(&m.reply)
        ));
        s.push_str("### Backends\n\n");
        s.push_str(&scale_table("backends", &m.by_backends, |p| {
            p.backends.to_string()
        }));
        s.push_str("\n### Flows in the table\n\n");
        s.push_str(&scale_table("flows", &m.by_flows, |p| {
            if p.table_entries == lb_common::MAX_FLOWS {
                thousands(p.flows as u64)
            } else {
                format!(
                    "{} (`max_flows` = {})",
                    thousands(p.flows as u64),
                    thousands(p.table_entries as u64)
                )
            }
        }));
        s.push_str(&format!(
            "\nThe default tables hold {} flows (`lb_common::MAX_FLOWS`, `[agent] max_flows`); \
             the 1M row loads the data plane with `max_flows` = 1 Mi, as the agent does. A \
             1000-backend VIP is built past the config check, \
             which allows 655 backends per VIP with the largest Maglev table (100 slots per \
             backend).\n\n",
            thousands(lb_common::MAX_FLOWS as u64)
        ));
    }

    if let Some(e2e) = &r.e2e {
        let o = &e2e.options;
        s.push_str("## 2. End to end in the lab\n\n");
        s.push_str(&format!(
            "Client, LB and three backends are network namespaces joined by veths to a bridge, \
             all on this VM's {} cores. Backends: nginx, one process each, plain HTTP on \
             :6443. Load: `wrk -t{} -c{} -d{}s --latency` from the client ({} runs per path and \
             mode, the paths visited in turn, the order rotating run by run, a {} s warm-up \
             each time a path is set up). CPU is the whole machine's busy time from \
             /proc/stat over the run, per 1000 requests; \"over direct\" is the run-by-run \
             difference with the direct path.\n\n",
            e.cores,
            o.threads,
            o.connections,
            o.duration.as_secs(),
            o.runs,
            o.warmup.as_secs()
        ));
        s.push_str("### Keep-alive\n\n");
        s.push_str(&e2e_table(e2e, Mode::KeepAlive));
        s.push_str(&format!(
            "\n### One request per connection (`Connection: close`), {} s\n\n",
            o.duration.as_secs()
        ));
        s.push_str(&e2e_table(e2e, Mode::Close));
        s.push_str(
            "\n### The same, first second only\n\n\
             One second of `Connection: close` right after TIME_WAIT was cleared everywhere: \
             what each path does before a NAT has to hand out a source port a second time.\n\n",
        );
        s.push_str(&e2e_table(e2e, Mode::CloseFirstSecond));
        s.push_str("\n### Ratios (median of the run-by-run ratios)\n\n");
        s.push_str(&ratio_table(e2e));
        s.push('\n');
        if let Some(lb) = e2e
            .get(PathKind::Lb, Mode::Close)
            // Only when clients actually waited: lb shifts timestamps onto its own clock,
            // so PAWS drops without retransmits are other paths' leftovers.
            .filter(|v| v.syn_retrans > 0)
        {
            s.push_str(&format!(
                "**Why lb's new connections/s trail.** In the close runs the client had to \
                 resend {} SYNs through lb, and the backends dropped {} SYNs by PAWS on a \
                 tuple in TIME_WAIT. Every connection leaves its backend holding the tuple \
                 (SNAT address:port, backend:6443) in TIME_WAIT for 60 s. lb hands out a \
                 backend's SNAT ports in turn over `snat_ports` (4,536 ports by default), so \
                 above about 4536 / 60 = 75 new connections per second per backend a port \
                 comes back while the backend still holds it; this kernel gives each \
                 connection its own TCP timestamp offset, so the new client connection's SYN \
                 usually carries an older timestamp than the one remembered for the tuple, \
                 is dropped, and the client retries a second later (a second time if the \
                 retry gets another such port). HAProxy (its own connections keep one \
                 timestamp clock per tuple) and nftables (it keeps the client's port, so a \
                 backend tuple stays with one client tuple) do not hit this. At these \
                 rates a backend's ring comes round after its first 4,536 connections, \
                 within the first second or two of a run, so the longer the run the lower \
                 lb's figure. This, not the XDP program's cost, holds lb back here: in \
                 the first second, before any ring comes round, lb makes {} new connections/s \
                 ({} HAProxy's, {} nftables').\n\n",
                lb.syn_retrans,
                lb.paws_timewait,
                opt(
                    e2e.get(PathKind::Lb, Mode::CloseFirstSecond).map(|v| v.rps),
                    |v| format!("{v:.0}")
                ),
                opt(e2e.ratio("lb/haproxy", Mode::CloseFirstSecond), x),
                opt(e2e.ratio("lb/nftables", Mode::CloseFirstSecond), x),
            ));
        }
    }

    s.push_str("## 3. Failover\n\n");
    match &r.failover {
        None => s.push_str("Not measured in this run (`lb-bench --only` left it out).\n\n"),
        Some(f) => s.push_str(&failover_section(f)),
    }

    s.push_str("## 4. Memory and health probes\n\n");
    if let Some(m) = &r.micro {
        let mm = &m.maps;
        s.push_str(&format!(
            "Maps at their default sizes: {} in all (the kernel's own accounting, `memlock` in \
             each map's fdinfo, on {} CPUs: per-CPU maps grow with the CPU count). A flow costs \
             {:.0} bytes (FLOWS + HALF_OPEN over {} connections, preallocated: the tables cost \
             this whether full or empty){}.\n\n",
            mib(mm.total_bytes as f64),
            mm.cpus,
            mm.bytes_per_flow,
            thousands(lb_common::MAX_FLOWS as u64),
            mm.marginal_bytes_per_flow
                .map(|b| format!("; each entry added by resizing the tables costs {b:.0} bytes"))
                .unwrap_or_default()
        ));
        s.push_str(
            "| map | type | key | value | max entries | memory |\n|---|---|---:|---:|---:|---:|\n",
        );
        for mm in &mm.maps {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                mm.name,
                map_type(mm.info.map_type),
                mm.info.key_size,
                mm.info.value_size,
                thousands(mm.info.max_entries as u64),
                mib(mm.info.memlock as f64)
            ));
        }
        s.push('\n');
    }
    let mut rss = Vec::new();
    if let Some(e2e) = &r.e2e {
        if let Some(k) = e2e.agent_rss_kib {
            rss.push(format!(
                "{:.1} MiB resident after the lb runs (3 backends, HTTP probes every 2 s; peak {})",
                k as f64 / 1024.0,
                e2e.agent_hwm_kib
                    .map(|h| format!("{:.1} MiB", h as f64 / 1024.0))
                    .unwrap_or_else(|| "n/a".into())
            ));
        }
    }
    for p in &r.probe {
        if let Some(k) = p.rss_kib {
            rss.push(format!(
                "{:.1} MiB probing {} backends over HTTPS every {} ms",
                k as f64 / 1024.0,
                p.backends,
                p.interval_ms
            ));
        }
    }
    if !rss.is_empty() {
        s.push_str(&format!("lb-agent (VmRSS): {}.\n\n", rss.join("; ")));
    }
    if !r.probe.is_empty() {
        s.push_str(
            "Health probes: the agent's utime + stime (/proc/PID/stat) over the window, as a \
             share of one core; HTTPS GET /readyz to lb-stub apiservers (a new TCP connection \
             and TLS handshake per probe, as the agent probes today).\n\n\
             | backends | interval | window | agent CPU | target | probes served |\n\
             |---:|---:|---:|---:|---:|---:|\n",
        );
        for p in &r.probe {
            s.push_str(&format!(
                "| {} | {} ms | {:.0} s | {:.2}% | < {}% | {} |\n",
                p.backends, p.interval_ms, p.window_s, p.cpu_pct, p.target_pct, p.probes
            ));
        }
        s.push('\n');
    }

    if let Some(so) = &r.socket {
        s.push_str(&socket_section(so));
    }

    s.push_str(WHAT_IT_SHOWS);

    s.push_str("## Exactly what ran\n\n");
    s.push_str(&format!("`{}` as root", e.command));
    s.push_str(
        " (it builds the release binaries, installs wrk, haproxy, nftables, nginx-light, \
         libnginx-mod-stream and keepalived when missing, and runs \
         `target/release/lb-bench`).\n\n",
    );
    if !e.tools.is_empty() {
        s.push_str("Tools: ");
        s.push_str(
            &e.tools
                .iter()
                .map(|(a, b)| format!("{a}: `{b}`"))
                .collect::<Vec<_>>()
                .join("; "),
        );
        s.push_str(".\n\n");
    }
    if let Some(e2e) = &r.e2e {
        let st = &e2e.setup;
        s.push_str("wrk, in the client's namespace (the lab's namespaces carry a per-run id):\n\n");
        s.push_str(&code("sh", &st.wrk.join("\n")));
        s.push_str(&format!(
            "\nThe client's namespace is set up with `{}` (the load generator's own \
             limits must not be what is measured). Before a path is set up, `ss -K state \
             time-wait` runs in every namespace: whoever closes first holds the tuple for \
             60 s, and HAProxy's, nftables' and the client's ports overlap, so a path \
             would otherwise pay for the TIME_WAIT of the path before it.\n",
            st.client_sysctls
        ));
        s.push_str(&format!(
            "\nPath order per run: {}.\n\n",
            st.order
                .iter()
                .map(|o| o.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
        s.push_str(
            "nginx on each backend (backend 1's; the others differ in address and names):\n\n",
        );
        s.push_str(&code("nginx", &st.nginx));
        s.push_str("\nHAProxy, in the LB's namespace, bound to the VIP (`haproxy -db -f haproxy.cfg`):\n\n");
        s.push_str(&code("haproxy", &st.haproxy));
        s.push_str(&format!(
            "\nnftables, in the LB's namespace (`{}` first, undone after):\n\n",
            st.nftables_sysctls
        ));
        s.push_str(&code("nft", &st.nftables));
        s.push_str("\nlb-agent, on the LB (`lb-agent run --config lb1.toml`); the VIP is on the LB's eth0 for every path:\n\n");
        s.push_str(&code("toml", &st.lb_agent));
        s.push('\n');
        checks(&mut s, "Checked after each path's runs:", &e2e.checks);
    }
    if let Some(f) = &r.failover {
        s.push_str(&failover_setup(f));
    }
    if let Some(so) = &r.socket {
        s.push_str(&socket_setup(so, r.e2e.is_none()));
    }
    if let Some(p) = r.probe.last() {
        s.push_str("lb-agent config for the 100-backend probe measurement (first backends):\n\n");
        let short: Vec<&str> = p.config.lines().take(30).collect();
        s.push_str(&code("toml", &format!("{}\n# ...", short.join("\n"))));
        s.push('\n');
    }
    s
}

fn kib(k: u64) -> String {
    mib(k as f64 * 1024.0)
}

/// The node-local table of one mode (also printed): each figure with its ratio to direct.
pub fn socket_table(so: &Socket, mode: Mode) -> String {
    let what = match mode {
        Mode::KeepAlive => "requests/s",
        Mode::CloseFirstSecond | Mode::Close => "new connections/s",
    };
    let mut s = format!(
        "| case | {what} | x direct | p50 | x direct | p99 | x direct | CPU ms per 1000 req \
         | x direct | the proxy's own CPU ms per 1000 req | the bench's share of the CPUs \
         | wrk errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for c in NodePath::ALL {
        let Some(v) = so.get(c, mode) else { continue };
        let xd = |r: Option<f64>| {
            if c == NodePath::Direct {
                "1".to_string()
            } else {
                opt(r, |v| format!("{v:.3}"))
            }
        };
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.0}% | {} |\n",
            c.label(),
            v.rps,
            xd(v.rps_x_direct),
            us(v.p50_us),
            xd(v.p50_x_direct),
            us(v.p99_us),
            xd(v.p99_x_direct),
            v.cpu_ms_per_1k,
            xd(v.cpu_x_direct),
            if c == NodePath::Direct {
                "-".to_string()
            } else {
                format!("{:.3}", v.proxy_cpu_ms_per_1k)
            },
            v.cpu_share * 100.0,
            v.errors
        ));
    }
    s
}

/// The socket mode against nginx and against direct-agent (also printed).
pub fn socket_ratio_table(so: &Socket) -> String {
    let mut s = String::from(
        "| ratio (median of the run-by-run ratios) | keep-alive | close |\n|---|---:|---:|\n",
    );
    for (label, name) in [
        ("socket / nginx, requests/s", "socket/nginx"),
        (
            "socket / direct with the agent running, requests/s",
            "socket/direct-agent",
        ),
        (
            "socket / direct with the agent running, CPU per request",
            "socket/direct-agent CPU",
        ),
    ] {
        s.push_str(&format!(
            "| {label} | {} | {} |\n",
            opt(so.ratio(name, Mode::KeepAlive), |v| format!("{v:.3}")),
            opt(so.ratio(name, Mode::Close), |v| format!("{v:.3}"))
        ));
    }
    s
}

/// The maps the socket-mode hooks use (the agent loads every map of the object).
const SOCKET_MAPS: [&str; 7] = [
    lb_common::map::VIPS,
    lb_common::map::MAGLEV,
    lb_common::map::BACKENDS,
    lb_common::map::SOCK_REVNAT,
    lb_common::map::STATS_VIP,
    lb_common::map::STATS_BACKEND,
    lb_common::map::STATS_REASON,
];

/// lb-agent's memory against nginx's (also printed).
pub fn socket_memory_table(so: &Socket) -> String {
    let mut s = String::from(
        "| process | RSS | PSS | peak RSS | BPF maps (kernel memory, not in RSS) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let used: u64 = so
        .agent_maps
        .iter()
        .filter(|m| SOCKET_MAPS.contains(&m.name.as_str()))
        .map(|m| m.info.memlock)
        .sum();
    let maps = so
        .agent_maps_bytes
        .map(|b| {
            format!(
                "{} (those the hooks use: {})",
                mib(b as f64),
                mib(used as f64)
            )
        })
        .unwrap_or_else(|| "n/a".into());
    for (who, m, maps) in [
        ("lb-agent, socket mode", so.agent, maps),
        ("nginx, master + 2 workers", so.nginx, "-".to_string()),
    ] {
        let Some(m) = m else { continue };
        s.push_str(&format!(
            "| {who} | {} | {} | {} | {maps} |\n",
            kib(m.rss_kib),
            kib(m.pss_kib),
            kib(m.hwm_kib)
        ));
    }
    s
}

const SOCKET_INTRO: &str = "Kubespray's default way for a node to reach the apiservers is \
an nginx static pod on every node (`nginx-proxy`) listening on 127.0.0.1:6443; lb's socket \
mode does the same job with cgroup hooks and no proxy ([node-local](node-local.md)). Here the \
lab's client namespace is the node and the three nginx backends are the apiservers:

- **direct**: wrk straight to the backends, no proxy: the baseline.
- **direct, lb-agent running**: the same while lb-agent runs as in the socket case, wrk \
outside its cgroup. The agent still wants an `agent.interface` ([node-local](node-local.md)) \
and attaches its XDP program (every packet the client receives crosses it, and passes) and \
its TC egress program (every packet it sends) to the client's eth0: this case shows what \
those cost, so that the socket case's difference with it is what the socket mode adds \
beyond them (the hooks, and connections spread by Maglev rather than by wrk thread).
- **lb socket mode**: lb-agent in the client's namespace with a socket-mode VIP at \
127.0.0.1:6443, its `connect4`/`getpeername4` hooks on a cgroup of the bench's; wrk runs \
inside that cgroup against `http://127.0.0.1:6443/`, so each connect() goes straight to a \
backend Maglev picks. Nothing listens on 127.0.0.1:6443 (checked before each case).
- **nginx**: Kubespray's nginx-proxy config (its `stream` block: `least_conn` over the \
three backends, `proxy_connect_timeout 1s`, `proxy_timeout 10m`; two workers; its HTTP \
healthz server on 8081), in the client's namespace on 127.0.0.1:6443; wrk runs outside the \
cgroup and no agent runs.

**Every case spreads over the three backends.** The end-to-end comparison above sends its \
direct load to one backend; here that would compare one nginx backend against three, not \
the paths. So wrk runs three threads, and in the direct cases a Lua script gives thread i \
the address of backend i: the same load generator and the same three backends in every \
case. The socket mode spreads its connections by Maglev over each socket's cookie, nginx by \
least connections, direct by thread; each backend's share of the backends' CPU in each case \
is listed under \"Exactly what ran\".

CPU per request is the CPU time of the bench's own processes over the wrk run, divided by \
the requests completed. Every process of this part (wrk, the backends' nginx, nginx-proxy, \
lb-agent) runs in a cgroup of the bench's, whose `cpu.stat` (usage_usec) counts their user \
and system time, including the kernel's network work done on their behalf; to it are added \
the ksoftirqd threads' utime + stime, which take over softirq work under load (theirs is \
all softirq work on the machine, the bench's and any other's). So a \
proxy's cost shows as the difference with direct, and other work on the machine, which \
the whole machine's /proc/stat (the end-to-end comparison's figure, kept in the JSON as \
`machine_cpu_ms_per_1k`) would count, does not. The \
proxy's own CPU is the utime + stime of lb-agent's process (its health probes; the hooks \
run in the connecting process, as its system time) or of nginx's master and workers, over \
the same run. Memory is read after each case's runs (the largest over the runs): VmRSS, \
Pss (/proc/PID/smaps_rollup: pages shared between nginx's master and workers counted once \
in all) and VmHWM, summed over nginx's three processes; for lb-agent also the kernel \
memory of its BPF maps (`memlock` in each pinned map's fdinfo), which RSS does not show.\n\n";

const SOCKET_SHOWS: &str = "What these figures show, and what they do not:

- **The hooks' own work is small, yet the socket case cost more CPU per request than \
direct with the agent running.** `lb_connect4` runs once per connect() (a Maglev lookup \
and one insert into the SOCK_REVNAT LRU hash); after it the socket is a plain connection to \
the backend. In a profile of wrk over a whole `--quick` run (`perf record -a -g`), \
`lb_connect4` and the LRU insert took about 0.01% of the samples each. What else differs \
between those two cases is how the connections spread: in the direct cases each wrk thread \
keeps its 10 connections on one backend, so a thread and a backend's nginx wake only for \
each other; through the socket mode (as through nginx-proxy) every thread talks to every \
backend, and Maglev over each socket's cookie leaves the backends with uneven numbers of \
wrk's 30 connections. The bench does not measure that apart: part of \"x direct\" may \
come from the spreading rather than from the path. nginx copies every byte through two sockets \
in user space and makes its own connection to the backend for each client connection.
- **Nothing is attached to eth0.** With only socket-mode VIPs the agent runs without an \
interface: no XDP or TC program, so direct with the agent running pays only for the agent's \
own probes ([node-local](node-local.md)).
- **lb-agent's maps**: with only socket-mode VIPs the flow tables shrink to their least \
(1024 connections), since the hooks never touch them; what remains is mostly the half-open \
table and SOCK_REVNAT, preallocated. nginx's memory grows with its connections (buffers per \
proxied connection); the agent's does not depend on them.
- **Requests/s and latency follow the CPU the bench had; CPU per request does not.** \
Every case saturates the machine's CPUs (wrk runs flat out), so when other work shares \
the machine, a case's requests/s and latency depend on how much of the CPUs it left the \
bench during that case's runs (the \"share of the CPUs\" column: 100% is the whole \
machine). CPU per request counts only the bench's own work, and is the figure to compare \
when the shares differ between cases. Its limit: this kernel charges CPU by ticks to \
whatever runs (no IRQ time accounting), so network work of the bench's that the kernel does \
in softirq context while another process is on the CPU is charged to that process; on a \
quiet machine the whole machine's CPU per request (`machine_cpu_ms_per_1k` in the JSON) \
checks it.
- **One small VM.** wrk, the proxies and the backends share the same two cores; the \
backends are nginx answering a 3-byte body over plain HTTP, not kube-apiservers behind \
TLS, which would make every request dearer and every proxy's share of it smaller. nginx \
here is Debian's 1.22 with the stream module loaded dynamically; Kubespray's static pod \
runs the official image's newer nginx.\n\n";

/// What the socket case's ratios say, in a few sentences.
fn socket_summary(so: &Socket) -> String {
    // (keep-alive, close) of a figure of `c`.
    let both = |c: NodePath, f: fn(&socket::Summary) -> Option<f64>| {
        Some((f(so.get(c, Mode::KeepAlive)?)?, f(so.get(c, Mode::Close)?)?))
    };
    let cpu = |v: &socket::Summary| v.cpu_x_direct;
    let rps = |v: &socket::Summary| v.rps_x_direct;
    let mut s = String::new();
    if let (Some((sk, sc)), Some((xk, xc)), Some((nk, nc))) = (
        both(NodePath::Socket, cpu),
        both(NodePath::DirectAgent, cpu),
        both(NodePath::Nginx, cpu),
    ) {
        s.push_str(&format!(
            "Per request, the socket mode cost {sk:.2}x direct's CPU with keep-alive and \
             {sc:.2}x with a new connection per request; direct with the agent running, no \
             hook in the way, {xk:.2}x and {xc:.2}x; Kubespray's nginx-proxy {nk:.2}x and \
             {nc:.2}x. "
        ));
    }
    if let (Some((sk, sc)), Some((nk, nc))) =
        (both(NodePath::Socket, rps), both(NodePath::Nginx, rps))
    {
        s.push_str(&format!(
            "In requests/s the socket mode made {sk:.2}x and {sc:.2}x direct's, nginx-proxy \
             {nk:.2}x and {nc:.2}x, with the CPUs other work left to each case (the share \
             column). "
        ));
    }
    let direct: Vec<f64> = so
        .samples
        .iter()
        .filter(|x| x.case == NodePath::Direct && x.mode == Mode::KeepAlive)
        .map(|x| x.wrk.rps)
        .collect();
    if direct.len() > 1 {
        let lo = direct.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = direct.iter().copied().fold(0.0, f64::max);
        s.push_str(&format!(
            "How far apart runs of the same case fell: direct's keep-alive runs made {lo:.0} \
             to {hi:.0} requests/s."
        ));
    }
    if !s.is_empty() {
        s.push_str("\n\n");
    }
    s
}

/// Section 5: the socket mode against Kubespray's nginx-proxy.
fn socket_section(so: &Socket) -> String {
    let o = &so.options;
    let mut s =
        String::from("## 5. Node-local: the socket mode against Kubespray's nginx-proxy\n\n");
    s.push_str(SOCKET_INTRO);
    s.push_str(&format!(
        "Load: `wrk -t{} -c{} -d{}s --latency` ({} runs, the cases visited in turn, the \
         order rotating run by run, a {} s keep-alive warm-up each time a case is set up); \
         \"x direct\" is the median of the run-by-run ratios to direct: above 1 is better \
         for requests/s, below 1 better for latency and CPU.\n\n",
        o.threads,
        o.connections,
        o.duration.as_secs(),
        o.runs,
        o.warmup.as_secs()
    ));
    s.push_str("### Keep-alive\n\n");
    s.push_str(&socket_table(so, Mode::KeepAlive));
    s.push_str("\n### One request per connection (`Connection: close`)\n\n");
    s.push_str(&socket_table(so, Mode::Close));
    s.push('\n');
    s.push_str(&socket_ratio_table(so));
    s.push('\n');
    s.push_str(&socket_summary(so));
    s.push_str("### Memory\n\n");
    s.push_str(&socket_memory_table(so));
    s.push('\n');
    s.push_str(SOCKET_SHOWS);
    s
}

/// The node-local configs and commands, for "Exactly what ran".
fn socket_setup(so: &Socket, with_backends: bool) -> String {
    let st = &so.setup;
    let mut s = String::from("Node-local (section 5): wrk in the client's namespace:\n\n");
    s.push_str(&code("sh", &st.wrk.join("\n")));
    s.push_str(&format!(
        "\nThe client's namespace is set up with `{}`; `ss -K state time-wait` runs in every \
         namespace before a case is set up and before each close run. Case order per run: \
         {}.\n\n",
        st.client_sysctls,
        st.order
            .iter()
            .map(|o| o.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    s.push_str("The direct case's wrk script:\n\n");
    s.push_str(&code("lua", &st.wrk_script));
    s.push_str(&format!(
        "\nnginx-proxy, in the client's namespace (`{}`), from Kubespray's \
         [`{KUBESPRAY_TEMPLATE}`](https://github.com/kubernetes-sigs/kubespray/blob/\
         {KUBESPRAY_COMMIT}/{KUBESPRAY_TEMPLATE}) at {}:\n\n",
        st.nginx_command,
        &KUBESPRAY_COMMIT[..12]
    ));
    s.push_str(&code("nginx", &st.nginx_proxy));
    s.push_str(&format!(
        "\nlb-agent in the client's namespace (`{}`):\n\n",
        st.agent_command
    ));
    s.push_str(&code("toml", &st.lb_agent));
    if with_backends {
        s.push_str("\nnginx on each backend (backend 1's; the others differ in names):\n\n");
        s.push_str(&code("nginx", &st.backend_nginx));
    }
    s.push('\n');
    checks(
        &mut s,
        "Checked after each case's runs (the backends' CPU: each one's share of the three backends' utime + stime over the case's runs):",
        &so.checks,
    );
    s
}

/// The facts a part checked along the way, as a list under `heading` (nothing if none).
fn checks(s: &mut String, heading: &str, checks: &[String]) {
    if checks.is_empty() {
        return;
    }
    s.push_str(heading);
    s.push_str("\n\n");
    for c in checks {
        s.push_str(&format!("- {c}\n"));
    }
    s.push('\n');
}

/// Within 25% of each other.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 0.25 * a.max(b)
}

/// A gap in ms; a run that ended in the outage gives only a lower bound.
fn gap_ms(v: f64, recovered: bool) -> String {
    format!("{}{v:.0} ms", if recovered { "" } else { ">= " })
}

/// The failover table: median gap per path, advert interval and way of stopping (also
/// printed).
pub fn failover_table(f: &Failover) -> String {
    let mut s = String::from(
        "| path | adverts | takeover due by (kill / SIGTERM) | master killed: longest gap | runs | \
         master stopped (SIGTERM): longest gap | runs | VIP on the backup after (kill / SIGTERM) |\n\
         |---|---|---:|---:|---|---:|---|---:|\n",
    );
    for v in Variant::ALL {
        let cells: Vec<(String, String, String)> = Stop::ALL
            .iter()
            .map(|&stop| match f.get(v, stop) {
                None => ("n/a".into(), "-".into(), "n/a".into()),
                Some(x) => (
                    x.median_gap_ms
                        .map(|m| gap_ms(m, x.all_recovered))
                        .unwrap_or_else(|| "n/a".into()),
                    x.gaps_ms
                        .iter()
                        .map(|g| format!("{g:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    opt(x.median_vip_moved_ms, |m| format!("{m:.0}")),
                ),
            })
            .collect();
        if cells.iter().all(|c| c.0 == "n/a") {
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {:.0} / {:.0} ms | {} | {} | {} | {} | {} / {} ms |\n",
            v.path_label(),
            v.advert_label(),
            v.takeover_bound(Stop::Kill).as_secs_f64() * 1000.0,
            v.takeover_bound(Stop::Term).as_secs_f64() * 1000.0,
            cells[0].0,
            cells[0].1,
            cells[1].0,
            cells[1].1,
            cells[0].2,
            cells[1].2,
        ));
    }
    s
}

/// Every failover run.
pub fn failover_runs_table(f: &Failover) -> String {
    let mut s = String::from(
        "| path | adverts | stop | run | longest gap | VIP on the backup after | gaps over 60 ms (from the stop) | requests ok / failed | failures | SYNs dropped by PAWS on the backends |\n\
         |---|---|---|---:|---:|---:|---|---:|---|---:|\n",
    );
    let mut samples: Vec<_> = f.samples.iter().collect();
    samples.sort_by_key(|x| {
        (
            Variant::ALL.iter().position(|v| *v == x.variant),
            x.stop == Stop::Term,
            x.run,
        )
    });
    for x in samples {
        let lead = x.lead_ms as f64;
        let gaps = if x.client.gaps.is_empty() {
            "-".to_string()
        } else {
            x.client
                .gaps
                .iter()
                .map(|(a, b)| format!("{:+.0} to {:+.0} ms", a - lead, b - lead))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {gaps} | {} / {} | {} | {} |\n",
            match x.variant.stack {
                Stack::Keepalived => "keepalived + HAProxy",
                _ => "lb",
            },
            x.variant.advert_label(),
            match x.stop {
                Stop::Kill => "kill",
                Stop::Term => "SIGTERM",
            },
            x.run + 1,
            gap_ms(x.client.max_gap_ms, x.client.recovered),
            opt(x.vip_moved_ms, |m| format!("{m:.0} ms")),
            x.client.ok,
            x.client.failed,
            if x.client.errors.is_empty() {
                "-".to_string()
            } else {
                x.client
                    .errors
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            x.backend_paws_drops
        ));
    }
    s
}

/// Long-lived connections through a failover, per stack (also printed).
pub fn survival_table(f: &Failover) -> String {
    let mut s = String::from(
        "| path | runs | connections that carried on | failed requests | reconnects | longest request |\n\
         |---|---:|---|---:|---:|---:|\n",
    );
    for stack in crate::bench::failover::SURVIVAL_STACKS {
        let runs: Vec<_> = f.survival.iter().filter(|x| x.stack == stack).collect();
        if runs.is_empty() {
            continue;
        }
        let each: Vec<String> = runs
            .iter()
            .map(|x| format!("{}/{}", x.survived, x.connections))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} ms |\n",
            stack.label(),
            runs.len(),
            each.join(", "),
            runs.iter().map(|x| x.failed_requests).sum::<u64>(),
            runs.iter().map(|x| x.reconnects).sum::<u64>(),
            runs.iter().map(|x| x.max_request_ms).max().unwrap_or(0)
        ));
    }
    s
}

fn survival_section(f: &Failover) -> String {
    format!(
        "### Connections already open\n\n\
         30 long-lived HTTPS connections through the VIP, each asking for `/version` every \
         100 ms with 1 s per request; adverts every 100 ms (VRRPv3 for both stacks); the \
         master is killed 2 s in. A connection carried on when none of its requests failed \
         and it never reconnected. Under NAT (lb or HAProxy) a connection lives in the \
         master's state, and the backup resets it; in the DSR modes the backup sends each \
         connection to the backend Maglev picks for it, the one the master used, and the \
         backends answer the clients directly. The longest request is how long TCP took to \
         retransmit into the new master.\n\n{}\n",
        survival_table(f)
    )
}

fn failover_section(f: &Failover) -> String {
    let o = &f.options;
    let mut s = format!(
        "Two LBs share the VIP by VRRP (virtual router 51, the master lb1, the backup lb2) \
         in front of three lb-stub apiservers (HTTPS); one client in its own namespace opens \
         a new TLS connection to the VIP every {} ms and asks for `/version`, giving each \
         request {} ms (connect, handshake, answer). The figure is the client's longest time \
         without a successful answer. The master goes away in two ways: **killed** (its link \
         set down and every process of its namespace SIGKILLed at once: the host died) and \
         **stopped** (SIGTERM: an orderly shutdown). The client starts {:.1} s before the \
         stop ({:.1} s with 1 s adverts), plus (r + ½)/{} of an advert interval in run r \
         (counting from 0) so that the runs stop the master at points spread over the advert \
         cycle, and runs on {:.1} s past the moment VRRP says the \
         backup must have taken over (3 × advert + skew time after a kill, the skew time \
         after a resignation; the backup has priority 100). Then the old master returns, \
         takes the VIP back (preemption) and serves again before the next case. {}\n\n",
        o.interval.as_millis(),
        o.timeout.as_millis(),
        o.lead.as_secs_f64(),
        o.lead_slow.as_secs_f64(),
        o.runs,
        o.margin.as_secs_f64(),
        if o.runs == 1 {
            "One run per case (`--quick`; `cargo xtask bench` runs each case three times \
             and reports the median), the variants visited in turn, the stacks alternating."
                .to_string()
        } else {
            format!(
                "{} runs per case and their median; the variants visited in turn, the stacks \
                 alternating, the order rotating run by run.",
                o.runs
            )
        }
    );
    s.push_str(
        "- **lb**: lb-agent on both LBs (priority 110 and 100, VRRPv3, NAT mode with native \
         XDP, the default health checks: HTTPS /readyz every second). At 1 s adverts lb runs VRRPv3 with \
         `advert_interval = \"1s\"`: the same timers as v2's `advert_int 1`.\n\
         - **keepalived + HAProxy**, the kubeadm HA guide's \"keepalived and haproxy\" \
         option: keepalived (VRRP only) with the guide's config (`state MASTER`/`BACKUP`, \
         priority 101/100, `auth_type PASS` for v2), once at the guide's default \
         `advert_int 1` (VRRPv2) and once at `vrrp_version 3` with `advert_int 0.1`; HAProxy \
         2.6 in mode tcp on `*:6443` on both LBs. Killing the master SIGKILLs keepalived and \
         HAProxy; stopping it sends SIGTERM to both at once (keepalived then advertises \
         priority 0 and drops the VIP; HAProxy closes its listener). No lb-agent and no XDP \
         on this path.\n\n",
    );
    s.push_str(&failover_table(f));
    s.push('\n');
    if !f.survival.is_empty() {
        s.push_str(&survival_section(f));
    }
    let gap = |v: Variant, stop: Stop| f.get(v, stop).and_then(|x| x.median_gap_ms);
    let [lb100, ka100, lb1s, ka1s] = Variant::ALL;
    if let (Some(a), Some(b)) = (gap(lb100, Stop::Kill), gap(ka1s, Stop::Kill)) {
        s.push_str(&format!(
            "A dead master: with the guide's settings (keepalived `advert_int 1`) the client \
             went {b:.0} ms without an answer, through lb at 100 ms adverts {a:.0} ms \
             ({:.1}x shorter). ",
            b / a
        ));
    }
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        gap(lb100, Stop::Kill),
        gap(ka100, Stop::Kill),
        gap(lb1s, Stop::Kill),
        gap(ka1s, Stop::Kill),
    ) {
        s.push_str(&format!(
            "At the same advert interval the two stacks compare as {a:.0} ms (lb) against \
             {b:.0} ms (keepalived + HAProxy) at 100 ms, and {c:.0} ms against {d:.0} ms at \
             1 s{}",
            if close(a, b) && close(c, d) {
                ": after a crash the VRRP timers, the same on both stacks, set the gap: the \
                 advert interval decides, not the stack. "
            } else {
                ". "
            }
        ));
    }
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        gap(lb100, Stop::Term),
        gap(ka100, Stop::Term),
        gap(lb1s, Stop::Term),
        gap(ka1s, Stop::Term),
    ) {
        s.push_str(&format!(
            "A stopped master resigns with priority 0 and the backup takes over after its \
             skew time: the client saw gaps of {a:.0} ms (lb) and {b:.0} ms (keepalived + \
             HAProxy) at 100 ms adverts, {c:.0} ms and {d:.0} ms at 1 s{}.",
            if a.max(c) < b.min(d) {
                "; lb's resigning agent keeps forwarding until the backup has taken over, \
                 where HAProxy stops at once and the client waits for the backup"
            } else {
                ""
            }
        ));
    }
    s.push_str("\n\n");
    let late: Vec<String> = f
        .samples
        .iter()
        .filter(|x| x.late())
        .map(|x| {
            format!(
                "{} {} run {}: VIP on the backup after {} (due by {:.0} ms; load average {})",
                x.variant.name(),
                x.stop.name(),
                x.run + 1,
                opt(x.vip_moved_ms, |m| format!("{m:.0} ms")),
                x.variant.takeover_bound(x.stop).as_secs_f64() * 1000.0,
                opt(x.load1, |l| format!("{l:.2}"))
            )
        })
        .collect();
    if !late.is_empty() {
        s.push_str(&format!(
            "**Later than VRRP allows:** {}. A backup takes over at most 3 × advert + skew \
             time after the master's last advert, so here the backup's timer, its adding \
             the address or the bench's polling ran late: on a busy machine, or while other \
             work creating or deleting interfaces and namespaces holds the kernel's rtnl \
             lock, which every netlink change waits for.\n\n",
            late.join("; ")
        ));
    }
    s.push_str("### Every run\n\n");
    s.push_str(&failover_runs_table(f));
    s.push_str(
        "\n\"VIP on the backup after\" is when `ip addr` first showed the VIP on lb2, polled \
         every ~10 ms from the stop (each poll runs `ip` in the namespace, so it can read some \
         20 ms late, past the takeover due); the client notices later (the backup's \
         gratuitous ARP, then its next request).\n\n",
    );
    s.push_str(FAILOVER_SHOWS);
    s
}

const FAILOVER_SHOWS: &str = "What these figures show, and what they do not:

- **The gap's resolution.** A request sent into the outage fails after its 200 ms timeout \
(a SYN lost to a dead or departed master is not resent within it) or at once (a reset), and \
the next one leaves 20 ms later; a request that left just before service came back waits \
out its 200 ms. So the gap is the outage rounded up to the next step of about 205 ms \
(timeout + interval, less the time a request takes), never shorter than it: after a kill it \
reads about 420 ms whenever the backup takes over between about 205 and 405 ms after the \
kill, whichever stack it is. The \"VIP on the backup after\" column (`ip addr` on the \
backup polled every ~10 ms) is the finer figure. The phase of the kill against the adverts \
varies too: the backup notices between 2 and 3 advert intervals + skew after the kill, \
depending on when it heard the last advert.
- **Killing a node takes its link down first**, then SIGKILLs every process in its \
namespace. The other way round keepalived resigns on its way down: its VRRP child gets \
SIGTERM when its parent dies (`PR_SET_PDEATHSIG`) and sends a priority 0 advert before it \
is killed too, so the backup takes over after the skew time alone (about 0.6 s instead of \
3.6 s at `advert_int 1`), which a host that loses power or its network never does.
- **New connections, then open ones.** In the gap table each request opens a new \
connection, so the gap is how long *new* connections fail. Connections already open \
through the old master (see \"Connections already open\") do not survive NAT, lb's or HAProxy's: \
lb's NAT flow table is not shared between the LBs (and the SNAT address changes), HAProxy's \
connections die with the HAProxy that held them; the new master resets them when their next \
packet arrives, and clients (kubectl, kubelets, controllers) reconnect and re-list/re-watch. \
In lb's DSR modes they carry on. How long an idle connection to a dead master takes to \
notice is not measured here.
- **A stopped master.** lb's agent keeps forwarding for two advert intervals after it \
resigns (clients whose ARP caches still point at it), HAProxy stops at once; keepalived and \
lb both hand over within the backup's skew time.
- **Each case starts clean.** Before each client run the backends drop their TIME_WAIT \
sockets (`ss -K state time-wait`). Without that, a case run just after lb1 was restarted \
could pay for the restart: a new lb-agent hands out each backend's SNAT ports from a new \
random point of its ring, which can land on ports its previous run used less than 60 s \
before; the backend still holds those tuples in TIME_WAIT and drops the new SYNs by PAWS, \
and those connections stall for a second (here: the client's 200 ms timeout). While \
building this benchmark that happened after 4 of 12 crash-and-restart cycles of lb1: in \
the 2 s after lb1 was master again, 2 to 4 failed requests and 7 to 12 PAWS drops on the \
backends each time, none after the other 8. The failover cases themselves do not depend on it: the backup \
that takes over has its own SNAT address.
- **A lab, not a network.** veths on one bridge on this VM's two cores: the gratuitous ARP \
reaches the client at once, with no switch to relearn the MAC. Backends are lb-stub, not \
kube-apiservers, and stay healthy throughout.
- **Health checks play no part.** keepalived runs without the guide's `check_apiserver` \
track script (interval 3, weight -2, fall 10): it acts only while keepalived lives and \
HAProxy or the apiserver does not (after about 30 s), which neither case here exercises; \
lb's own probes and tracking likewise stay quiet. HAProxy's `default-server inter 10s \
downinter 5s rise 2 fall 2 slowstart 60s maxconn 250 maxqueue 256 weight 100` is the common \
variant of the guide's config (kubeadm's own page has plain `check` and `option \
ssl-hello-chk`); with healthy backends and one client it changes nothing here.

";

/// The failover configs, for \"Exactly what ran\".
fn failover_setup(f: &Failover) -> String {
    let st = &f.setup;
    let mut s = String::from("Failover (section 3): the client, in its own namespace:\n\n");
    s.push_str(&code("sh", &st.loadgen));
    let mut runs: Vec<String> = Vec::new();
    for v in Variant::ALL {
        for stop in Stop::ALL {
            if let Some(x) = f.samples.iter().find(|x| x.variant == v && x.stop == stop) {
                runs.push(format!(
                    "{} {}: {:.1} s (stopped after {:.1} s)",
                    v.name(),
                    stop.name(),
                    x.client_ms as f64 / 1000.0,
                    x.lead_ms as f64 / 1000.0
                ));
            }
        }
    }
    s.push_str(&format!("\n`DURATION` per case: {}.\n", runs.join("; ")));
    s.push_str(&format!(
        "\nVariant order per run: {}.\n\n",
        st.order
            .iter()
            .map(|o| o.join(", "))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    if let Some(c) = st.lb_agent.first() {
        s.push_str(
            "lb-agent on lb1 (`lb-agent run --config lb1.toml`; lb2: priority 100, its own pin \
             path and socket; at 1 s adverts `advert_interval = \"1s\"`):\n\n",
        );
        s.push_str(&code("toml", c));
        s.push('\n');
    }
    for (i, c) in st.keepalived.iter().enumerate() {
        if i == 0 {
            s.push_str(
                "keepalived on lb1 (`keepalived --dont-fork --log-console --log-detail \
                 --vrrp --use-file keepalived.conf`, Debian's keepalived 2.2; lb2: \
                 `state BACKUP`, `priority 100`):\n\n",
            );
        }
        s.push_str(&code("", c));
        s.push('\n');
    }
    if !st.haproxy.is_empty() {
        s.push_str("HAProxy on both LBs (`haproxy -db -f haproxy.cfg`):\n\n");
        s.push_str(&code("haproxy", &st.haproxy));
        s.push('\n');
    }
    if !f.checks.is_empty() {
        s.push_str("Checked after each variant's runs:\n\n");
        for c in &f.checks {
            s.push_str(&format!("- {c}\n"));
        }
        s.push('\n');
    }
    s
}

const WHAT_IT_SHOWS: &str = "## What these numbers show, and what they do not

- **One small VM.** Client, LB and backends share the same two cores, so the end-to-end \
figures measure how much of that shared CPU each path leaves to nginx and wrk. That is the \
question an LB host's CPU answers too, but the absolute requests/s are this VM's, not a \
NIC's. CPU per 1000 requests is the steadier figure; \"over direct\" is what the path adds.
- **veth, not a NIC.** lb attaches in native mode to a veth; XDP_TX on a veth hands the frame \
to the peer, whose bridge port needs an XDP program of its own (the lab attaches XDP_PASS to \
the LB's bridge port for every path, so all paths pay the same). On a real NIC the XDP path \
avoids the stack entirely and the gap to the kernel paths is larger; here both sides pay for \
the veth and bridge.
- **Direct is one backend.** The direct path sends all load to backend 1's single nginx \
process, the LB paths spread it over three; when one nginx saturates, lb/direct can exceed 1. \
One busy nginx also does more per wake-up than three less busy ones, so \"CPU over direct\" \
includes the cost of spreading the load over three backends, the same for every LB path: \
it overstates each path's own cost, and lb's share of HAProxy's overhead with it.
- **HAProxy** runs with the kubeadm guide's settings (two threads, the default on this VM) \
but without logging, which would cost it more in production. **nftables** (dnat + \
masquerade with conntrack) stands in for IPVS, which this kernel does not have.
- **What a packet costs.** An established packet (either direction) is one hash lookup in \
FLOWS whose value is the finished rewrite and the cached next hop, array reads (ADDR_FILTER, \
AGENT_META, BACKENDS, the per-CPU clock cache) and three per-CPU counters; no helper call \
besides the lookup. A SYN adds two inserts into LRU hashes (the reply entry that claims the \
SNAT port, the forward entry, both in HALF_OPEN) and lookups that miss in large tables, which \
dominate its cost (`lb-bench --profile syn` under `perf record -a -g`: about half in \
`htab_lru_map_update_elem`, a quarter in bucket walks). The XDP_PASS floor does none of this. \
This VM's kernel runs with retpolines and \"Safe RET\" (SRSO) mitigations, which make every \
helper call dearer than on bare metal.
- **The microbenchmark** runs the program on one buffer again and again, so the flow entry, \
the Maglev slot and the FIB entry stay in the CPU cache: it is the program's cost without \
cache misses, a floor for a busy LB whose tables exceed the cache. The flow-table rows show \
what a fuller hash table costs the SYN path (inserts) more than the established path (one \
key, always cached). The backends sit at the VIP's own address there so that each run's \
rewrite yields the next run's packet (see `tests/src/bench/micro.rs`); the program does the \
same work whatever the addresses.
- **Not measured here:** many clients (all traffic comes from one address), long-lived \
watches, packet loss. The DSR paths' backends decapsulate IPIP with lb's TC program \
(this kernel has no ipip device), which costs them more than an ipip device would.

";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(262144), "262,144");
        assert_eq!(thousands(10), "10");
        assert_eq!(us(530.0), "530 µs");
        assert_eq!(us(1550.0), "1.55 ms");
        assert_eq!(x(1.5), "1.50x");
    }

    #[test]
    fn targets_say_met_or_not() {
        let r = Results {
            probe: vec![ProbeCost {
                backends: 3,
                interval_ms: 200,
                window_s: 20.0,
                cpu_ticks: 10,
                cpu_pct: 0.5,
                target_pct: 1.0,
                probes: 300,
                rss_kib: Some(10240),
                config: String::new(),
            }],
            ..Default::default()
        };
        let t = targets(&r);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].met, Some(true));
        let table = targets_table(&t);
        assert!(table.contains("| 0.50% | met |"), "{table}");
    }
}
