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
    lab::{agent_cli, assert_spread, backend_name, backend_status, wait_for, Lab, Proc, CLIENT},
    socket_lab::{self, client_sh, loadgen, sh_in, Cgroup},
    vrrp_lab::VRRP_HEALTH,
};

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
    let cgroup = socket_lab::cgroup(&lab, "socket");
    let backends = socket_lab::lab_backends(&lab);
    let c = socket_lab::config(&lab, &cgroup, "", VRRP_HEALTH, &backends);
    let agent = socket_lab::start_agent(&lab, &c, Duration::from_secs(20), |s| {
        (0..3).all(|i| backend_status(s, &backend_name(i))["state"] == "up")
    });
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
    // No XDP anywhere: the agent runs without an interface.
    assert_eq!(status["agent"]["ifindex"], 0, "{status}");
    assert_eq!(status["agent"]["xdp_mode"], "none", "{status}");
    assert_eq!(status["agent"]["socket_hooks"], true, "{status}");
    // No flows to keep: the flow tables are at their least.
    assert_eq!(
        status["flow_table"]["capacity"],
        lb_agent::config::MIN_MAX_FLOWS,
        "{status}"
    );
    let links = lab.exec(&lab.client, &["ip", "-d", "link", "show"]);
    assert!(
        !links.contains("xdp"),
        "no XDP program in the client: {links}"
    );
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
    agent_cli("restart", &s.config);
    let log = lab.dir.join("agent-client.log");
    wait_for(
        Duration::from_secs(20),
        "the restarted agent serves",
        || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("adopting the data plane"))
                && lab.status(&s.config)["agent"]["restarted_by"].is_string()
        },
    );
    let hooks = cgroup_hooks(cg);
    assert_eq!(hooks.matches("lb_connect4").count(), 1, "{hooks}");
    assert_eq!(hooks.matches("lb_getpeername4").count(), 1, "{hooks}");
    let report = loadgen(lab, Some(cg), 30);
    assert_eq!(report["ok"], 30, "{report}");

    // Outside the cgroup nothing changes: nothing listens on 127.0.0.1:6443 there.
    let report = loadgen(lab, None, 5);
    assert_eq!(report["ok"], 0, "{report}");

    // In the cgroup but in another network namespace (a pod's), 127.0.0.1:6443 is that
    // namespace's own: its listener gets the connection.
    let (ok, out, err) = sh_in(
        &lab.lbs[0],
        Some(cg),
        "python3 -c 'import socket\n\
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
l.bind((\"127.0.0.1\", 6443)); l.listen(); l.settimeout(3)\n\
c = socket.create_connection((\"127.0.0.1\", 6443), timeout=3)\n\
a, peer = l.accept(); print(c.getpeername()[0], peer[0])'",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "127.0.0.1 127.0.0.1");
    let status = lab.status(&s.config);
    assert_eq!(status["counters"]["sock_other_netns"], 1, "{status}");

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

    // `--log-format json`, kept through the restart: one JSON object per line, and the
    // killed backend's change is one event with its fields.
    let log = std::fs::read_to_string(lab.dir.join("agent-client.log")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events.len() > 5, "{log}");
    assert!(
        events.iter().any(|e| e["event"] == "backend_state"
            && e["vip"] == "kube-apiserver"
            && e["backend"] == "master01"
            && e["from"] == "up"
            && e["to"] == "down"
            && e["level"] == "INFO"),
        "{log}"
    );
}
