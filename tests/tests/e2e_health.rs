//! End to end: health checks move traffic within interval × fall + timeout + 1 s and
//! never disturb flows to healthy backends.

use std::time::{Duration, Instant};

use lb_tests::lab::{backend_name, backend_status as backend, Lab};
use nix::sys::signal::Signal;
use serde_json::Value;

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const FALL: u64 = 2;
const RISE: u64 = 2;

fn bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * FALL + TIMEOUT_MS + 1000)
}

/// Polls status until `pred` holds for backend `name`; returns how long it took.
fn until(
    lab: &Lab,
    config: &std::path::Path,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let s = lab.status(config);
        if pred(backend(&s, name)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{name} never became {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_and_unready_backends_leave_and_healthy_flows_never_break() {
    let Some(lab) = Lab::new("e2e_health", 1, 3) else {
        return;
    };
    let mut stubs = lab.start_stubs();
    lab.add_vip(0);
    let health = format!(
        "interval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\nrise = {RISE}\nfall = {FALL}\n"
    );
    let config = lab.agent_config(0, "", &health);
    let _agent = lab.start_agent(0, &config);
    for i in 0..3 {
        until(&lab, &config, &backend_name(i), "up", |b| {
            b["state"] == "up"
        });
    }
    let s = lab.status(&config);
    let h = &backend(&s, "master01")["health"];
    assert_eq!(h["health"], "up");
    assert_eq!(h["last_result"], "ok");
    assert!(h["last_latency_ms"].as_f64().unwrap() > 0.0);
    assert!(h["last_change_unix"].as_u64().unwrap() > 0);

    // 30 long-lived connections, a request every 100 ms each.
    let long = lab.spawn_long_lived("long1", 8);
    std::thread::sleep(Duration::from_secs(2));

    // SIGKILL master01: marked down in time, no new connection reaches it.
    stubs[0].signal(Signal::SIGKILL);
    let took = until(&lab, &config, "master01", "down", |b| b["state"] == "down");
    println!("master01 killed: down after {took:?} (bound {:?})", bound());
    assert!(
        took <= bound(),
        "marked down after {took:?}, bound {:?}",
        bound()
    );
    let s = lab.status(&config);
    let h = &backend(&s, "master01")["health"];
    assert_eq!(h["down_reason"], "unreachable");
    assert!(
        h["last_failure"].as_str().unwrap().contains("refused"),
        "{h}"
    );
    assert_eq!(
        backend(&s, "master01")["slots"],
        0,
        "out of the Maglev table"
    );

    let report = lab.loadgen("/version", &["--count", "100", "--concurrency", "4"]);
    assert_eq!(report["ok"], 100, "new connections all succeed: {report}");
    assert!(
        report["backends"]["master01"].is_null(),
        "none to master01: {report}"
    );

    let long = long.finish(Duration::from_secs(20));
    let mut reconnected = 0;
    for c in long["connections"].as_array().unwrap() {
        if c["backend_first"] == "master01" {
            assert!(c["requests_failed"].as_u64().unwrap() >= 1, "{c}");
            let ok_elsewhere: u64 = ["master02", "master03"]
                .iter()
                .map(|n| c["backends"][*n].as_u64().unwrap_or(0))
                .sum();
            assert!(
                ok_elsewhere > 0,
                "its client reconnected and succeeded: {c}"
            );
            reconnected += 1;
        } else {
            assert_eq!(
                c["requests_failed"], 0,
                "a connection to a healthy stub failed: {c}"
            );
        }
    }
    println!("{reconnected} of 30 connections were on master01 and reconnected");

    // Back: up after `rise` probes, takes new connections again.
    stubs[0] = lab.start_stub(0);
    let took = until(&lab, &config, "master01", "up", |b| b["state"] == "up");
    println!("master01 restarted: up after {took:?}");
    let report = lab.loadgen("/version", &["--count", "150", "--concurrency", "4"]);
    assert_eq!(report["ok"], 150, "{report}");
    assert!(
        report["backends"]["master01"].as_u64().unwrap_or(0) > 0,
        "master01 gets new connections: {report}"
    );

    // master02 answers /readyz with 503, as an apiserver in graceful shutdown does.
    let long = lab.spawn_long_lived("long2", 5);
    std::thread::sleep(Duration::from_secs(1));
    lab.stub_admin(1, "/mode?readyz=503");
    let took = until(&lab, &config, "master02", "down (not ready)", |b| {
        b["state"] == "down"
    });
    println!("master02 not ready: down after {took:?}");
    assert!(took <= bound(), "marked down after {took:?}");
    let s = lab.status(&config);
    assert_eq!(
        backend(&s, "master02")["health"]["down_reason"],
        "not ready"
    );
    assert!(backend(&s, "master02")["health"]["last_failure"]
        .as_str()
        .unwrap()
        .contains("503"));
    let report = lab.loadgen("/version", &["--count", "100", "--concurrency", "4"]);
    assert_eq!(report["ok"], 100, "{report}");
    assert!(
        report["backends"]["master02"].is_null(),
        "no new connection to a not-ready backend: {report}"
    );
    let long = long.finish(Duration::from_secs(20));
    assert_eq!(
        long["failed"], 0,
        "existing connections, also to master02, keep working: {long}"
    );
    let on_master02 = long["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["backend_first"] == "master02")
        .count();
    println!("{on_master02} connections stayed on the not-ready master02 without a failure");
    lab.stub_admin(1, "/mode?readyz=200");

    // An operator drains master03: at once in status, no new connections, undrain undoes it.
    let agent = lb_tests::lab::bin("lb-agent");
    let run = |cmd: &str| {
        let out = std::process::Command::new(&agent)
            .args([cmd, "kube-apiserver", "master03", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("drain");
    let s = lab.status(&config);
    assert_eq!(
        backend(&s, "master03")["state"],
        "drain",
        "drain shows at once"
    );
    assert_eq!(backend(&s, "master03")["health"]["drained"], true);
    let report = lab.loadgen("/version", &["--count", "60", "--concurrency", "4"]);
    assert_eq!(report["ok"], 60, "{report}");
    assert!(
        report["backends"]["master03"].is_null(),
        "no new connection to a drained backend: {report}"
    );
    run("undrain");
    assert_eq!(backend(&lab.status(&config), "master03")["state"], "up");
    let out = std::process::Command::new(&agent)
        .args(["drain", "kube-apiserver", "nosuch", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backend named \"nosuch\""));
}
