//! Reloading the config in place: two LBs with VRRP at 100 ms, 30 long-lived HTTPS clients
//! and a client opening a new connection every 10 ms while backends are added, removed and
//! configs refused. Nothing may fail on the long-lived connections.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{backend_name, bin, Lab},
    vrrp_lab::{poll_until, Pair, VRRP_HEALTH},
};

/// `lb-agent reload --config FILE`: (exit code, stdout, stderr).
fn reload(config: &Path) -> (i32, String, String) {
    let out = Command::new(bin("lb-agent"))
        .args(["reload", "--config"])
        .arg(config)
        .output()
        .expect("run lb-agent reload");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `lb-agent check-config --config FILE`'s stderr.
fn check_config(config: &Path) -> String {
    let out = Command::new(bin("lb-agent"))
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("run lb-agent check-config");
    assert_eq!(out.status.code(), Some(2), "check-config refuses it");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Requests backend `i` served on /version (clients only; probes ask /readyz).
fn version_requests(lab: &Lab, i: usize) -> u64 {
    lab.stub_stats(i)["requests"]["/version"]
        .as_u64()
        .unwrap_or(0)
}

/// The VIP's backend named `name` in `lb-agent status --json`, if listed.
fn status_backend(lab: &Lab, config: &Path, name: &str) -> Option<serde_json::Value> {
    let s = lab.status(config);
    s["vips"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

/// Rewrites both LBs' configs (`configs`) with `backends` and `[vrrp]` at priorities 110
/// and 90.
fn write_configs(
    lab: &Lab,
    configs: [&std::path::PathBuf; 2],
    backends: &[(String, std::net::Ipv4Addr, u16)],
) {
    for (i, c) in configs.into_iter().enumerate() {
        let vrrp = Pair::vrrp(if i == 0 { 110 } else { 90 }, 100, "");
        let p = lab.agent_config_backends(i, "", VRRP_HEALTH, backends);
        assert_eq!(&p, c);
        let mut t = std::fs::read_to_string(&p).unwrap();
        t.push_str(&format!("\n[vrrp]\n{vrrp}\n"));
        std::fs::write(&p, t).unwrap();
    }
}

#[test]
fn reload_adds_and_removes_backends_and_refuses_bad_configs_without_losing_a_request() {
    let Some((pair, _a1, _a2)) = Pair::with_backends("reload", 100, "", "", 4, 3) else {
        return;
    };
    let lab = &pair.lab;
    let [c1, c2] = &pair.configs;
    let sha_before = lab.status(c1)["config"]["sha256"].clone();
    let long = lab.spawn_long_lived("reload-long", 14);
    let fresh = lab.spawn_new_connections("reload-new", 14);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(version_requests(lab, 3), 0, "m4 is not in the configs yet");

    // 1. A mistake: refused with check-config's line, nothing changes.
    let broken = lab.dir.join("broken.toml");
    let text = std::fs::read_to_string(c1).unwrap();
    std::fs::write(
        &broken,
        text.replacen(
            "name = \"kube-apiserver\"",
            "name = \"kube-apiserver\"\nweight = 5",
            1,
        ),
    )
    .unwrap();
    let (code, out, err) = reload(&broken);
    assert_eq!(code, 2, "refused: {out} {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(err, check_config(&broken), "the same line as check-config");
    // Something that cannot change in place: refused naming the field.
    let moved = lab.dir.join("moved.toml");
    std::fs::write(&moved, text.replacen("port = 6443", "port = 6444", 1)).unwrap();
    let (code, _, err) = reload(&moved);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("vip[0].port") && err.contains("cannot change in place"),
        "{err}"
    );
    assert_eq!(
        lab.status(c1)["config"]["sha256"],
        sha_before,
        "the agent keeps its config"
    );

    // 2. A fourth backend, added on both LBs.
    let four: Vec<_> = (0..4)
        .map(|b| {
            (
                backend_name(b),
                lab.backends[b].addr,
                lb_tests::lab::VIP_PORT,
            )
        })
        .collect();
    // lb2's priority drops too: VRRP settings change in place.
    write_configs(lab, [c1, c2], &four);
    let t0 = Instant::now();
    let (code, out, err) = reload(c1);
    assert_eq!(code, 0, "reload lb1: {out} {err}");
    assert!(
        out.lines().any(|l| l.starts_with(&format!(
            "VIP kube-apiserver: backend {} added",
            backend_name(3)
        ))),
        "{out}"
    );
    let (code, out2, err) = reload(c2);
    assert_eq!(code, 0, "reload lb2: {out2} {err}");
    assert!(out2.contains("vrrp.priority: 100 -> 90"), "{out2}");
    let v2 = lab.vrrp_status(c2).unwrap();
    assert_eq!(v2["base_priority"], 90, "{v2}");
    assert_eq!(v2["effective_priority"], 90, "{v2}");
    let serving =
        poll_until(Duration::from_secs(5), || version_requests(lab, 3) > 0).map(|t| t - t0);
    println!("reload printed:\n{out}m4 got its first new connection after {serving:?}");
    let serving = serving.expect("m4 never got a connection");
    assert!(serving < Duration::from_secs(3), "{serving:?}");
    let s = lab.status(c1);
    assert_ne!(
        s["config"]["sha256"], sha_before,
        "status shows the new file"
    );
    assert_eq!(
        status_backend(lab, c1, &backend_name(3)).expect("the new backend listed")["state"],
        "up"
    );

    // 3. m1 removed, by SIGHUP on both: its connections are kept (drain), no new ones.
    let three: Vec<_> = four[1..].to_vec();
    write_configs(lab, [c1, c2], &three);
    for agent in [&_a1, &_a2] {
        agent.signal(nix::sys::signal::Signal::SIGHUP);
    }
    let m1_name = backend_name(0);
    let drained = poll_until(Duration::from_secs(3), || {
        status_backend(lab, c1, &m1_name).is_some_and(|b| b["state"] == "drain")
    });
    assert!(drained.is_some(), "m1 drained: {}", lab.status(c1));
    let m1 = status_backend(lab, c1, &m1_name).unwrap();
    assert_eq!(m1["health"]["removed"], true, "{m1}");
    let kept = m1["flows"].as_u64().unwrap();
    // New connections now go elsewhere (connection: close, one request each).
    let after = lab.loadgen("/version", &["--count", "200", "--concurrency", "4"]);
    assert_eq!(after["failed"], 0, "{after}");
    assert_eq!(
        after["backends"][&m1_name].as_u64().unwrap_or(0),
        0,
        "no new connection reaches the removed backend: {after}"
    );
    let before = version_requests(lab, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        version_requests(lab, 0) > before,
        "the removed backend keeps serving the long-lived connections it had"
    );

    let long = long.finish(Duration::from_secs(30));
    let fresh = fresh.finish(Duration::from_secs(30));
    println!(
        "long-lived: {} ok, {} failed; new connections: {} ok, {} failed, longest gap {} ms; m1 kept {kept} flows after its removal",
        long["ok"], long["failed"], fresh["ok"], fresh["failed"], fresh["max_gap_ms"]
    );
    assert_eq!(long["failed"], 0, "no long-lived request fails: {long}");
    assert!(long["ok"].as_u64().unwrap() > 1000, "{long}");
    assert_eq!(fresh["failed"], 0, "no new connection fails: {fresh}");
    assert!(kept > 0, "some connections were on m1 when it was removed");

    // 4. Its connections ended: the removed backend goes away by itself.
    let gone = poll_until(Duration::from_secs(15), || {
        status_backend(lab, c1, &m1_name).is_none()
    });
    assert!(
        gone.is_some(),
        "m1 released once its connections ended: {}",
        lab.status(c1)
    );
}
