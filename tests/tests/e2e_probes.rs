//! Health semantics that protect an overloaded control plane, end to end: an apiserver that
//! accepts and never answers, or answers /readyz slowly, is "not ready" (no new connections,
//! its connections kept); one that refuses is "unreachable" (its connections move). When every
//! backend fails for a reason on the LB side (here: the CA file is wrong), the VIP keeps
//! serving in panic mode, and fixing the file on disk ends it without a restart.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{backend_name, backend_status as backend, Lab},
    vrrp_lab::poll_until,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const HEALTH: &str = "interval = \"300ms\"\ntimeout = \"250ms\"\nrise = 2\nfall = 2\n";

fn wait(lab: &Lab, config: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Duration {
    let t0 = Instant::now();
    let ok = poll_until(Duration::from_secs(10), || f(&lab.status(config)));
    assert!(ok.is_some(), "never {what}: {}", lab.status(config));
    t0.elapsed()
}

#[test]
fn hung_and_slow_apiservers_keep_their_connections_and_a_refusing_one_loses_them() {
    let Some(lab) = Lab::new("pr_reasons", 1, 3) else {
        return;
    };
    let stubs = lab.start_stubs();
    lab.add_vip(0);
    let config = lab.agent_config(0, "", HEALTH);
    let _agent = lab.start_agent(0, &config);
    wait(&lab, &config, "all up", |s| {
        (0..3).all(|i| backend(s, &backend_name(i))["state"] == "up")
    });
    let long = lab.spawn_long_lived("long", 6);
    std::thread::sleep(Duration::from_secs(1));
    // master01 accepts TCP and never answers (an apiserver too busy to handshake);
    // master02 answers /readyz after 1 s, longer than the 250 ms probe timeout.
    lab.stub_admin(0, "/mode?accept=hang");
    lab.stub_admin(1, "/mode?readyz_delay_ms=1000");
    let took = wait(&lab, &config, "master01 and master02 not ready", |s| {
        ["master01", "master02"].iter().all(|n| {
            backend(s, n)["state"] == "down"
                && backend(s, n)["health"]["down_reason"] == "not ready"
        })
    });
    let s = lab.status(&config);
    println!(
        "hung and slow: not ready after {took:?}: {} / {}",
        backend(&s, "master01")["health"]["last_failure"],
        backend(&s, "master02")["health"]["last_failure"]
    );
    assert!(backend(&s, "master01")["health"]["last_failure"]
        .as_str()
        .unwrap()
        .contains("timeout after connect"));
    let report = lab.loadgen("/version", &["--count", "40", "--concurrency", "2"]);
    assert_eq!(report["ok"], 40, "{report}");
    assert_eq!(
        report["backends"]["master03"], 40,
        "new connections only to the ready one: {report}"
    );
    let long = long.finish(Duration::from_secs(20));
    assert_eq!(
        long["failed"], 0,
        "no connection was cut, also on master01/02: {long}"
    );
    let kept = long["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["backend_first"] != "master03")
        .count();
    println!("{kept} long-lived connections stayed on the not-ready backends");
    assert!(kept > 0);

    // Back to normal; then master03 refuses (its apiserver is gone): unreachable.
    lab.stub_admin(0, "/mode?accept=normal");
    lab.stub_admin(1, "/mode?readyz_delay_ms=0");
    wait(&lab, &config, "all up again", |s| {
        (0..3).all(|i| backend(s, &backend_name(i))["state"] == "up")
    });
    stubs[2].signal(Signal::SIGKILL);
    wait(&lab, &config, "master03 unreachable", |s| {
        backend(s, "master03")["health"]["down_reason"] == "unreachable"
    });
    let s = lab.status(&config);
    assert!(backend(&s, "master03")["health"]["last_failure"]
        .as_str()
        .unwrap()
        .contains("refused"));
}

#[test]
fn a_wrong_ca_everywhere_is_panic_mode_not_a_blackhole_and_fixing_the_file_ends_it() {
    let Some(lab) = Lab::new("pr_panic", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    lab.add_vip(0);
    let pki = lab.dir.join("pki");
    // The agent's CA file is a copy that starts out wrong (a rotation gone half-way).
    let ca = lab.dir.join("probe-ca.crt");
    std::fs::copy(pki.join("other-ca.crt"), &ca).unwrap();
    let config = lab.agent_config(0, "", HEALTH);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &pki.join("ca.crt").display().to_string(),
        &ca.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let _agent = lab.start_agent(0, &config);
    wait(&lab, &config, "in panic", |s| {
        !s["vips"][0]["health_panic"].is_null()
    });
    let s = lab.status(&config);
    println!("panic: {}", s["vips"][0]["health_panic"]);
    for i in 0..3 {
        let b = backend(&s, &backend_name(i));
        assert_eq!(b["health"]["down_reason"], "LB side", "{b}");
        assert_eq!(b["health"]["served_in_panic"], true, "{b}");
        assert_eq!(b["state"], "up", "served: {b}");
    }
    let report = lab.loadgen("/version", &["--count", "30", "--concurrency", "2"]);
    assert_eq!(report["ok"], 30, "the VIP is not blackholed: {report}");
    let text = lb_tests::lab::bin("lb-agent");
    let out = std::process::Command::new(text)
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("PANIC"), "status shows it: {shown}");

    // The right CA lands on disk (renamed into place, as kubeadm does): no restart needed.
    let tmp = lab.dir.join("probe-ca.crt.new");
    std::fs::copy(pki.join("ca.crt"), &tmp).unwrap();
    std::fs::rename(&tmp, &ca).unwrap();
    let took = wait(&lab, &config, "healthy by its probes", |s| {
        s["vips"][0]["health_panic"].is_null()
            && (0..3).all(|i| {
                let b = backend(s, &backend_name(i));
                b["health"]["health"] == "up" && b["health"]["served_in_panic"] == false
            })
    });
    println!("CA fixed on disk: healthy again after {took:?}");
}
