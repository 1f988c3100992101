//! End to end, lb on the control-plane nodes themselves: three nodes, each running a stub
//! apiserver on 0.0.0.0:6443, two of them running lb-agent with VRRP (adverts every 100
//! ms); the VIP's backends are the three nodes' addresses, so the VIP holder is one of its
//! own backends.
//! - 300 new connections through VIP:6443 all succeed and spread over the three nodes;
//!   the holder's own apiserver sees the client's address (no NAT on the local path);
//! - the same through VIP:1644 with the apiservers on :6443 (the HAProxy-on-the-masters
//!   layout), replies given the VIP's port back by TC;
//! - the holder's node dies: new connections succeed again on the two survivors;
//! - the holder's apiserver stops being ready while the node lives: with
//!   `local_backend_down` the VIP moves; without, it stays and goes to the other two;
//! - bootstrap: the first node's agent takes the VIP before any apiserver is up and serves
//!   as soon as the local one answers;
//! - an address the node gets later makes the backend at it local.

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{assert_spread, backend_name, backend_status, wait_for, Lab, Proc, CLIENT},
    vrrp_lab::{poll_until, Pair, VRRP_HEALTH},
};

/// Failover timings are measured here: one lab at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const ADVERT_MS: u64 = 100;

/// Three nodes with stubs, agents on the first two (priority 110 and 100, `track` in both
/// `[vrrp]` tables), the VIP on `vip_port`; node 1 is master when this returns.
fn colocated(test: &str, vip_port: u16, track: &str) -> Option<(Pair, Proc, Proc)> {
    let mut lab = Lab::colocated(test, 3)?;
    lab.vip_port = vip_port;
    let stubs = lab.start_stubs_any();
    let c1 = lab.agent_config_vrrp_vip(0, "", VRRP_HEALTH, &Pair::vrrp(110, ADVERT_MS, track), 3);
    let c2 = lab.agent_config_vrrp_vip(1, "", VRRP_HEALTH, &Pair::vrrp(100, ADVERT_MS, track), 3);
    let (pair, a1, a2) = Pair::start(lab, [c1, c2], stubs);
    for c in &pair.configs {
        wait_states(&pair.lab, c, &["up", "up", "up"]);
    }
    Some((pair, a1, a2))
}

/// Waits until the agent using `config` sees the nodes' apiservers in `states`.
fn wait_states(lab: &Lab, config: &Path, states: &[&str]) {
    wait_for(
        Duration::from_secs(10),
        &format!("backends {states:?}"),
        || {
            let s = lab.status(config);
            states
                .iter()
                .enumerate()
                .all(|(i, st)| backend_status(&s, &backend_name(i))["state"] == *st)
        },
    );
}

/// `n` requests, each on a new connection; asserts all succeed and returns how many each
/// node served.
fn spread(lab: &Lab, n: u64) -> [u64; 3] {
    let report = lab.loadgen(
        "/version",
        &["--count", &n.to_string(), "--concurrency", "4"],
    );
    assert_eq!(report["ok"], n, "all requests succeed: {report}");
    let mut served = [0; 3];
    for (i, s) in served.iter_mut().enumerate() {
        *s = report["backends"][&backend_name(i)].as_u64().unwrap_or(0);
    }
    println!("{n} connections: served {served:?}");
    served
}

fn three_hundred(test: &str, vip_port: u16) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, _a1, _a2)) = colocated(test, vip_port, "") else {
        return;
    };
    let footprint = pair.lab.footprint();
    {
        let lab = &pair.lab;
        let report = lab.loadgen("/version", &["--count", "300", "--concurrency", "4"]);
        assert_eq!(report["ok"], 300, "all requests succeed: {report}");
        let served = assert_spread(&report, 300, 3);
        println!("300 connections: served {served:?}");
        let local = lab.stub_stats(0);
        assert_eq!(
            local["peers"][CLIENT.to_string()].as_u64().unwrap_or(0),
            served[0],
            "the VIP holder's own apiserver sees the client's address: {local}"
        );
        let status = lab.status(&pair.configs[0]);
        assert_eq!(
            backend_status(&status, "master01")["local"],
            true,
            "{status}"
        );
        assert_eq!(
            backend_status(&status, "master02")["local"],
            false,
            "{status}"
        );
        let counters = &status["counters"];
        assert!(
            counters["local"].as_u64().unwrap() >= served[0] * 5,
            "{counters}"
        );
        if vip_port != lb_tests::lab::VIP_PORT {
            assert!(
                counters["local_reply"].as_u64().unwrap() >= served[0] * 4,
                "replies get the VIP's port back: {counters}"
            );
        }
        assert_eq!(counters["drop_tail_call"], 0, "{counters}");
    }
    drop(pair);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn colocated_three_hundred_new_connections_on_the_apiserver_port() {
    three_hundred("e2e_colo_6443", 6443);
}

#[test]
fn colocated_three_hundred_new_connections_on_another_port() {
    three_hundred("e2e_colo_1644", 1644);
}

#[test]
fn colocated_the_vip_holders_node_dies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, mut a1, _a2)) = colocated("e2e_colo_dies", 6443, "") else {
        return;
    };
    let lab = &pair.lab;
    let client = pair.gap_client("colo-gap", 5);
    std::thread::sleep(Duration::from_millis(1500));
    let k0 = Instant::now();
    lab.kill_node(0, &mut a1);
    let vip = poll_until(Duration::from_secs(3), || lab.has_vip(1)).map(|t| t - k0);
    assert!(vip.is_some(), "node 2 takes the VIP");
    wait_states(lab, &pair.configs[1], &["down", "up", "up"]);
    let detected = k0.elapsed();
    let report = client.finish(Duration::from_secs(15));
    println!(
        "node 1 killed: VIP on node 2 after {vip:?}, node 1's apiserver down after {detected:?}; \
         client gap {} ms ({} ok, {} failed)",
        report["max_gap_ms"], report["ok"], report["failed"]
    );
    // The VRRP takeover (3 adverts and the skew) and the health probes (fall 2 at 200 ms,
    // 150 ms timeouts) each bound the outage; a SYN Maglev sent to the dead node meanwhile
    // is retried by the client after 1 s.
    let gap = report["max_gap_ms"].as_f64().unwrap();
    assert!(gap < 2500.0, "client gap {gap} ms: {report}");
    let served = spread(lab, 100);
    assert_eq!(served[0], 0);
    assert!(
        served[1] >= 20 && served[2] >= 20,
        "spread over the survivors: {served:?}"
    );
}

/// Node 1's apiserver answers /readyz with 503 while the node lives.
fn local_not_ready(test: &str, track: &str) -> Option<(bool, [u64; 3])> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pair, _a1, _a2) = colocated(test, 6443, track)?;
    let lab = &pair.lab;
    lab.stub_admin(0, "/mode?readyz=503");
    wait_states(lab, &pair.configs[0], &["down", "up", "up"]);
    // Long enough for a priority change to show.
    std::thread::sleep(Duration::from_millis(ADVERT_MS * 10));
    let moved = lab.has_vip(1);
    if moved {
        pair.wait_master(1, Duration::from_secs(3));
    } else {
        pair.wait_master(0, Duration::from_secs(3));
    }
    Some((moved, spread(lab, 100)))
}

#[test]
fn colocated_a_not_ready_local_apiserver_moves_the_vip_with_local_backend_down() {
    let Some((moved, served)) =
        local_not_ready("e2e_colo_track", "[vrrp.track]\nlocal_backend_down = 30")
    else {
        return;
    };
    assert!(moved, "the VIP moves to node 2");
    assert_eq!(served[0], 0, "{served:?}");
}

#[test]
fn colocated_a_not_ready_local_apiserver_keeps_the_vip_without_it() {
    let Some((moved, served)) = local_not_ready("e2e_colo_notrack", "") else {
        return;
    };
    assert!(!moved, "the VIP stays on node 1");
    assert_eq!(served[0], 0, "{served:?}");
    assert!(served[1] >= 20 && served[2] >= 20, "{served:?}");
}

/// `kubeadm init --control-plane-endpoint VIP:6443` on the first node: the agent starts
/// before any apiserver is up, takes the VIP, and serves as soon as the local apiserver
/// answers, to the node itself (kubeadm) and to clients.
#[test]
fn colocated_bootstrap_before_any_apiserver() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::colocated("e2e_colo_boot", 3) else {
        return;
    };
    lab.certs();
    // The config already lists the nodes that will join.
    let c1 = lab.agent_config_vrrp_vip(0, "", VRRP_HEALTH, &Pair::vrrp(110, ADVERT_MS, ""), 3);
    let _a1 = lab.start_agent(0, &c1);
    let vip = poll_until(Duration::from_secs(5), || lab.has_vip(0));
    assert!(
        vip.is_some(),
        "the agent takes the VIP with no apiserver up:\n{}",
        lab.agent_log_tail(0, 20)
    );
    let t0 = Instant::now();
    let _stub = lab.start_stub_on(0, std::net::Ipv4Addr::UNSPECIFIED);
    wait_states(&lab, &c1, &["up", "down", "down"]);
    println!(
        "the local apiserver is up in lb's maps {:?} after it was started",
        t0.elapsed()
    );
    // kubeadm on the node itself reaches the VIP (the kernel delivers it locally)...
    let url = format!("https://{}:6443/version", lb_tests::lab::VIP);
    let out = lab.lbs[0].ns.sh(&format!(
        "curl -sf --max-time 2 --cacert {} {url}",
        lab.dir.join("pki/ca.crt").display()
    ));
    assert!(out.contains("master01"), "{out}");
    // ...and so do clients, through lb.
    let served = spread(&lab, 30);
    assert_eq!(served[0], 30);
}

/// An address the node gets after the agent started (a second address, DHCP late) makes
/// the backend at it local at the next reconcile: before, its connections would be NATed
/// to the node itself and never answered.
#[test]
fn colocated_an_address_added_later_makes_its_backend_local() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::colocated("e2e_colo_addr", 1) else {
        return;
    };
    let _stub = lab.start_stubs_any();
    let later = std::net::Ipv4Addr::new(198, 18, 0, 20);
    let backends = [
        (backend_name(0), lab.lbs[0].addr, 6443),
        ("later".to_string(), later, 6443),
    ];
    // The lab's certificate names the nodes' first addresses, not the one added later.
    let health = format!("{VRRP_HEALTH}\nserver_name = \"kubernetes\"");
    let c = lab.agent_config_backends(0, "", &health, &backends);
    let text = std::fs::read_to_string(&c).unwrap().replacen(
        "[agent]\n",
        "[agent]\nreconcile_interval = \"1s\"\n",
        1,
    );
    std::fs::write(&c, text).unwrap();
    lab.add_vip(0);
    let _a = lab.start_agent(0, &c);
    let s = lab.status(&c);
    assert_eq!(backend_status(&s, "master01")["local"], true, "{s}");
    assert_eq!(backend_status(&s, "later")["local"], false, "{s}");

    lab.lbs[0]
        .ns
        .sh(&format!("ip addr add {later}/24 dev eth0"));
    let up = poll_until(Duration::from_secs(10), || {
        let s = lab.status(&c);
        let b = backend_status(&s, "later");
        b["local"] == true && b["state"] == "up"
    });
    assert!(
        up.is_some(),
        "the backend at the new address local and up: {}",
        backend_status(&lab.status(&c), "later")
    );
    let report = lab.loadgen("/version", &["--count", "40", "--concurrency", "4"]);
    assert_eq!(report["ok"], 40, "{report}");
    let s = lab.status(&c);
    assert!(
        backend_status(&s, "later")["new_flows"].as_u64().unwrap() > 0,
        "Maglev gave it connections, served locally: {s}"
    );
}
