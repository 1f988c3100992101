//! End to end, socket mode: lb-agent in the client's namespace with its connect4 and
//! getpeername4 hooks on a cgroup the test creates; three stub apiservers behind them.
//! Processes in that cgroup connect to 127.0.0.1:6443 (Kubespray's localhost endpoint)
//! and reach a backend directly; processes outside it are not affected.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    cgroup::Cgroup,
    lab::{assert_spread, backend_name, backend_status, bin, wait_for, Lab, Proc, CLIENT},
    vrrp_lab::VRRP_HEALTH,
};

/// Runs `cmd` with sh in the client's network namespace, inside `cgroup` if given; returns
/// (success, stdout, stderr).
fn client_sh(lab: &Lab, cgroup: Option<&Cgroup>, cmd: &str) -> (bool, String, String) {
    // nsenter, not `ip netns exec`: that remounts /sys, and the cgroup tree with it.
    let mut words = lab.client.ns.nsenter_words();
    words.extend(cgroup.map(Cgroup::enter).unwrap_or_default());
    let out = Command::new(&words[0])
        .args(&words[1..])
        .args(["sh", "-c", cmd])
        .output()
        .expect("nsenter");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// lb-loadgen against https://127.0.0.1:6443/version from the client (in `cgroup` if given).
fn loadgen(lab: &Lab, cgroup: Option<&Cgroup>, n: u32) -> serde_json::Value {
    let cmd = format!(
        "exec {} --url https://127.0.0.1:6443/version --ca {} --count {n} --concurrency 4 --timeout 1s",
        bin("lb-loadgen").display(),
        lab.dir.join("pki/ca.crt").display()
    );
    let (_, out, err) = client_sh(lab, cgroup, &cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("loadgen {out:?} {err}: {e}"))
}

/// `bpftool cgroup show CGROUP`: the programs attached there, by name.
fn cgroup_hooks(cg: &Cgroup) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cg.path())
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Setup {
    config: PathBuf,
    agent: Proc,
    stubs: Vec<Proc>,
    cgroup: Cgroup,
    lab: Lab,
}

fn setup(test: &str) -> Option<Setup> {
    // One LB host, unused but for its pin path, which the lab cleans up.
    let lab = Lab::new(test, 1, 3)?;
    let stubs = lab.start_stubs();
    let cgroup =
        Cgroup::create(&format!("lb-{}-socket", lab.id)).expect("create the test's cgroup");
    let c = lab.socket_agent_config(cgroup.path(), VRRP_HEALTH);
    let mut agent = lab.spawn_net_only(
        &lab.client,
        "agent-client",
        &[
            bin("lb-agent").to_str().unwrap(),
            "run",
            "--config",
            c.to_str().unwrap(),
        ],
    );
    if let Err(e) = lab.wait_backends_up(&mut agent, &c, Duration::from_secs(20)) {
        panic!("the agent did not come up: {e}");
    }
    Some(Setup {
        config: c,
        agent,
        stubs,
        cgroup,
        lab,
    })
}

#[test]
fn socket_mode_connects_the_cgroups_processes_straight_to_a_backend() {
    let Some(mut s) = setup("e2e_socket") else {
        return;
    };
    let lab = &s.lab;
    let cg = &s.cgroup;

    // 300 connections from the cgroup: spread, and each backend sees the client itself.
    let report = loadgen(lab, Some(cg), 300);
    assert_eq!(report["ok"], 300, "{report}");
    for (i, served) in assert_spread(&report, 300, 3).into_iter().enumerate() {
        let name = backend_name(i);
        // Every connection it saw came from the client itself (the agent's probes too:
        // it runs there).
        let stub = lab.stub_stats(i);
        let peers = stub["peers"].as_object().expect("peers");
        assert_eq!(
            peers.keys().collect::<Vec<_>>(),
            [&CLIENT.to_string()],
            "{name} sees the client's own address: {stub}"
        );
        assert_eq!(stub["requests"]["/version"], served, "{stub}");
    }
    let status = lab.status(&s.config);
    assert_eq!(status["vips"][0]["mode"], "socket", "{status}");
    assert_eq!(status["vips"][0]["new_flows"], 300, "{status}");
    assert_eq!(status["counters"]["sock_connect"], 300, "{status}");

    // getpeername() reports what the process connected to.
    let (ok, out, err) = client_sh(
        lab,
        Some(cg),
        "python3 -c 'import socket; s=socket.create_connection((\"127.0.0.1\", 6443)); print(s.getpeername())'",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "('127.0.0.1', 6443)");

    // `lb-agent restart` (an upgrade: the agent execs the binary on disk) replaces the
    // hooks' programs in place: still one of each on the cgroup, and connections go on.
    let out = Command::new(bin("lb-agent"))
        .args(["restart", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lb-agent restart: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let hooks = cgroup_hooks(cg);
    assert_eq!(hooks.matches("lb_connect4").count(), 1, "{hooks}");
    assert_eq!(hooks.matches("lb_getpeername4").count(), 1, "{hooks}");
    let report = loadgen(lab, Some(cg), 30);
    assert_eq!(report["ok"], 30, "{report}");

    // Outside the cgroup nothing changes: nothing listens on 127.0.0.1:6443 there.
    let report = loadgen(lab, None, 5);
    assert_eq!(report["ok"], 0, "{report}");

    // A backend killed: new connections avoid it within interval x fall + timeout + 1 s.
    drop(s.stubs.remove(0));
    std::thread::sleep(Duration::from_millis(200 * 2 + 150 + 1000));
    let report = loadgen(lab, Some(cg), 60);
    assert_eq!(report["ok"], 60, "{report}");
    assert!(report["backends"]["master01"].is_null(), "{report}");

    // No backend up: connect() fails at once with ECONNREFUSED.
    s.stubs.clear();
    wait_for(Duration::from_secs(5), "every backend down", || {
        let st = lab.status(&s.config);
        (0..3).all(|i| backend_status(&st, &backend_name(i))["state"] == "down")
    });
    let t0 = Instant::now();
    let (ok, _, err) = client_sh(
        lab,
        Some(cg),
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 6443), timeout=5)'",
    );
    let took = t0.elapsed();
    assert!(!ok && err.contains("ConnectionRefusedError"), "{err}");
    assert!(
        took < Duration::from_secs(2),
        "refused at once, took {took:?}"
    );
    assert!(
        lab.status(&s.config)["counters"]["sock_refused"]
            .as_u64()
            .unwrap()
            >= 1,
        "counted"
    );

    // The agent stopped: the hooks are detached and their pins gone.
    s.agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        s.agent.wait(Duration::from_secs(15)).is_some(),
        "the agent stops"
    );
    let hooks = cgroup_hooks(cg);
    assert!(!hooks.contains("lb_connect4"), "{hooks}");
    let pin = lab.pin_path(0);
    assert!(!pin.join(lb_common::LINK_CONNECT4_PIN).exists());
}
