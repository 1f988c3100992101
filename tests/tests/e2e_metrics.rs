//! Metrics end to end: a real Prometheus (Debian's package) scrapes the agent's `/metrics`
//! every second in the lab; PromQL through its HTTP API sees the connections made through
//! the VIP and a killed backend go down. `promtool` accepts the exposition and the alert
//! rules, and the dashboard and the rules use only families the agent has.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::lab::{backend_name, backend_status, Lab};

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const FALL: u64 = 2;
const METRICS: &str = "127.0.0.1:8297";
const PROMETHEUS: &str = "127.0.0.1:19090";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// True when `bin` is on PATH; under CI=true its absence fails the test.
fn have(bin: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{test}: {bin} is missing (Debian package prometheus; `cargo xtask test` installs it)"
        );
        eprintln!("SKIP {test}: no {bin} (apt-get install prometheus)");
    }
    found
}

/// The `lb_...` names an expression uses.
fn lb_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("lb_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_use_only_lb_families() {
    let rules = repo("packaging/prometheus/lb-alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let known: HashSet<String> = lb_agent::metrics::sample_names().into_iter().collect();
    let mut used = 0;
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for n in lb_names(line) {
            assert!(
                known.contains(&n),
                "{}: {n} is no lb metric",
                rules.display()
            );
            used += 1;
        }
    }
    assert!(used >= 10, "the rules use lb's metrics");
    if !have("promtool", "alert rules") {
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dashboard_queries_only_lb_families() {
    let path = repo("packaging/grafana/lb-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let known: HashSet<String> = lb_agent::metrics::sample_names().into_iter().collect();
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let names = lb_names(expr);
            assert!(!names.is_empty(), "{}: {expr}", p["title"]);
            for n in names {
                assert!(known.contains(&n), "{}: {n} is no lb metric", p["title"]);
            }
        }
    }
}

/// GET `url` with curl in LB 0's namespace: the body, or None.
fn get(lab: &Lab, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.lbs[0].ns.name,
            "curl",
            "-sf",
            "--max-time",
            "2",
        ])
        .arg(url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A PromQL instant query's first value, if the result has one.
fn query(lab: &Lab, promql: &str) -> Option<f64> {
    let url = format!(
        "http://{PROMETHEUS}/api/v1/query?query={}",
        promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let v: serde_json::Value = serde_json::from_str(&get(lab, &url)?).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Polls until `f` holds; how long it took.
fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn prometheus_sees_connections_and_a_killed_backend() {
    let Some(lab) = Lab::new("e2e_metrics", 1, 3) else {
        return;
    };
    if !have("prometheus", "e2e_metrics") || !have("promtool", "e2e_metrics") {
        return;
    }
    let mut stubs = lab.start_stubs();
    lab.add_vip(0);
    let health =
        format!("interval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\nfall = {FALL}\n");
    let config = lab.agent_config(0, "", &health);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[metrics]\nlisten = \"{METRICS}\"\n"));
    std::fs::write(&config, text).unwrap();
    let _agent = lab.start_agent(0, &config);

    let prom = lab.dir.join("prometheus.yml");
    std::fs::write(
        &prom,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let _prometheus = lab.spawn_net_only(
        &lab.lbs[0],
        "prometheus",
        &[
            "prometheus",
            &format!("--config.file={}", prom.display()),
            &format!("--storage.tsdb.path={}", lab.dir.join("tsdb").display()),
            &format!("--web.listen-address={PROMETHEUS}"),
        ],
    );
    until("Prometheus ready", Duration::from_secs(30), || {
        get(&lab, &format!("http://{PROMETHEUS}/-/ready")).is_some()
    });

    // The endpoint: the exposition passes promtool; health and readiness answer.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.lbs[0].ns.name, "sh", "-c"])
        .arg(format!(
            "curl -sf http://{METRICS}/metrics | promtool check metrics"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&lab, &format!("http://{METRICS}/healthz")).as_deref(),
        Some("ok\n")
    );
    assert_eq!(
        get(&lab, &format!("http://{METRICS}/readyz")).as_deref(),
        Some("ok\n")
    );

    // 200 requests through the VIP: Prometheus counts at least 200 new connections.
    let r = lab.loadgen("/version", &["--count", "200", "--concurrency", "4"]);
    assert_eq!(r["ok"], 200, "{r}");
    let took = until(
        "sum(lb_backend_new_flows_total) >= 200",
        Duration::from_secs(20),
        || query(&lab, "sum(lb_backend_new_flows_total)").is_some_and(|v| v >= 200.0),
    );
    println!("Prometheus counted the 200 connections {took:?} after the last one");
    assert_eq!(query(&lab, "count(lb_backend_up == 1)"), Some(3.0));

    // A backend killed: lb_backend_up drops to 0 within the health bound plus one scrape
    // (and the query's own staleness: a second more).
    let t0 = Instant::now();
    drop(stubs.remove(0));
    let bound = Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS + 1000);
    let name = backend_name(0);
    until(
        "lb_backend_up 0 for the killed backend",
        bound + Duration::from_secs(5),
        || query(&lab, &format!("lb_backend_up{{backend=\"{name}\"}}")) == Some(0.0),
    );
    let took = t0.elapsed();
    println!("killed {name}: lb_backend_up 0 in Prometheus after {took:?} (health bound {bound:?}, scrape 1s)");
    assert!(took <= bound + Duration::from_secs(2), "{took:?}");
    let st = lab.status(&config);
    assert_eq!(backend_status(&st, &name)["state"], "down", "{st}");
    assert!(
        query(
            &lab,
            &format!("sum(lb_backend_probe_failures_total{{backend=\"{name}\"}})")
        )
        .is_some_and(|v| v >= FALL as f64),
        "failures counted"
    );
    assert_eq!(
        query(
            &lab,
            &format!("lb_backend_state{{backend=\"{name}\",state=\"down\"}}")
        ),
        Some(1.0)
    );
}

/// A scrape at 1000 backends, against real pinned maps (per-CPU counters included): the
/// figure is printed for the record, not asserted (the machine is shared); the test checks
/// that every backend is there.
#[test]
fn a_scrape_reads_a_thousand_backends() {
    use lb_tests::fixture::{BackendSpec, Fixture, Options};
    let o = Options {
        backends: (0..1000)
            .map(|i| BackendSpec {
                name: format!("scrape{:04}", i + 1),
                addr: std::net::Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250) as u8 + 1),
                port: 6443,
                mac: [0x02, 0, 0, 0, (i >> 8) as u8, i as u8],
            })
            .collect(),
        ..Options::default()
    };
    let Some(f) = Fixture::with("scrape1k", o) else {
        return;
    };
    let mut times = Vec::new();
    let mut text = String::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let report = lb_agent::status::gather_from(
            f.pin_path(),
            Path::new("/nonexistent/lb-agent.sock"),
            Ok(lb_agent::control::Response {
                ok: true,
                ..Default::default()
            }),
        )
        .expect("status of the fixture's maps");
        text = lb_agent::metrics::to_prometheus_text(&lb_agent::metrics::render(&report));
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "scrape at 1000 backends (maps read, families built, encoded): median {:?}, {} bytes, {} CPUs",
        times[2],
        text.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("lb_backend_up{"))
            .count(),
        1000
    );
}
