//! VRRP end to end: two agents (lb1 priority 110, lb2 priority 100) share the VIP; a client
//! sends a request every 20 ms. Election, a dead master, a resigning master, preemption,
//! tracking, unicast.

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_tests::{
    lab::Proc,
    vrrp_lab::{poll_until, Pair},
};

/// Failover timings are what these tests measure: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const ADVERT_MS: u64 = 100;

/// 3 × advert + skew of lb2 (priority 100) + 100 ms.
fn takeover_bound() -> Duration {
    let adv = Duration::from_millis(ADVERT_MS);
    adv * 3 + adv * (256 - 100) / 256 + Duration::from_millis(100)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn start_pair(test: &str, extra1: &str, extra2: &str) -> Option<(Pair, Proc, Proc)> {
    Pair::new(test, ADVERT_MS, extra1, extra2)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn dead_master_fails_over_fast_and_returns_with_preemption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, mut a1, _a2)) = start_pair("vrrp_kill", "", "") else {
        return;
    };
    let lab = &pair.lab;
    let s = lab.vrrp_status(&pair.configs[0]).unwrap();
    assert_eq!(s["effective_priority"], 110);
    assert!(s["adverts_sent"].as_u64().unwrap() > 0);
    let s2 = lab.vrrp_status(&pair.configs[1]).unwrap();
    assert_eq!(s2["master"], "198.18.0.2", "lb2 knows the master: {s2}");
    assert!(s2["adverts_received"].as_u64().unwrap() > 0);

    let mut gaps = Vec::new();
    let mut takeovers = Vec::new();
    for round in 0..3 {
        let client = pair.gap_client(&format!("gap{round}"), 4);
        std::thread::sleep(Duration::from_millis(1500));
        let t0 = unix_now();
        let k0 = Instant::now();
        lab.kill_node(0, &mut a1);
        let took = poll_until(Duration::from_secs(3), || lab.has_vip(1)).map(|t| t - k0);
        let report = client.finish(Duration::from_secs(15));
        let s2 = lab.vrrp_status(&pair.configs[1]).unwrap();
        assert_eq!(s2["state"], "master", "{s2}");
        let became = s2["last_transition_unix"].as_f64().unwrap() - t0;
        println!("round {round}: lb2 master {became:.3}s after the kill (VIP seen {took:?}); client gap {} ms ({} ok, {} failed: {}; gaps {})", report["max_gap_ms"], report["ok"], report["failed"], report["errors"], report["gaps"]);
        assert!(
            Duration::from_secs_f64(became.max(0.0)) <= takeover_bound(),
            "lb2 took over after {became:.3}s, bound {:?}",
            takeover_bound()
        );
        let gap = report["max_gap_ms"].as_f64().unwrap();
        assert!(gap < 1000.0, "client gap {gap} ms: {report}");
        gaps.push(gap);
        takeovers.push(became * 1000.0);

        // lb1 returns; preempt = true (default): it takes the VIP back.
        lab.revive_node(0);
        a1 = lab.start_agent(0, &pair.configs[0]);
        pair.wait_master(0, Duration::from_secs(5));
    }
    println!(
        "median of 3: takeover {:.0} ms, client gap {:.0} ms",
        median(takeovers),
        median(gaps)
    );
}

#[test]
fn resigning_master_hands_over_within_skew_time_and_no_preempt_keeps_the_backup() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // lb1 does not preempt: after a restart it stays backup.
    let Some((pair, mut a1, _a2)) = start_pair("vrrp_term", "preempt = false", "") else {
        return;
    };
    let lab = &pair.lab;
    let mut gaps = Vec::new();
    let client = pair.gap_client("gapterm", 4);
    std::thread::sleep(Duration::from_millis(1500));
    let st = a1
        .terminate(Duration::from_secs(10))
        .expect("agent stops on SIGTERM");
    assert!(st.success());
    let report = client.finish(Duration::from_secs(15));
    let gap = report["max_gap_ms"].as_f64().unwrap();
    println!("SIGTERM: client gap {gap} ms");
    assert!(gap < 300.0, "gap {gap} ms after a SIGTERM: {report}");
    gaps.push(gap);
    assert!(
        lab.has_vip(1) && !lab.has_vip(0),
        "VIP moved to lb2 and left lb1"
    );
    assert!(!lab.pin_path(0).exists(), "lb1 cleaned up");

    let _a1 = lab.start_agent(0, &pair.configs[0]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lab.vrrp_state(&pair.configs[0]),
        "backup",
        "preempt = false: lb1 stays backup"
    );
    assert_eq!(lab.vrrp_state(&pair.configs[1]), "master");
    assert!(lab.has_vip(1) && !lab.has_vip(0));
}

#[test]
fn a_master_whose_backends_all_fail_hands_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, _a1, _a2)) = start_pair("vrrp_track", "", "") else {
        return;
    };
    let lab = &pair.lab;
    // lb1 loses its way to the apiservers: its own probes are dropped (forwarded traffic
    // never meets the OUTPUT hook, so only the probes die).
    lab.lbs[0].ns.sh("nft add table inet lbtest && \
         nft add chain inet lbtest out '{ type filter hook output priority 0; }' && \
         nft add rule inet lbtest out tcp dport 6443 drop");
    let took = poll_until(Duration::from_secs(5), || {
        lab.vrrp_state(&pair.configs[1]) == "master" && lab.has_vip(1) && !lab.has_vip(0)
    });
    assert!(
        took.is_some(),
        "lb2 did not take over: {:?}",
        lab.vrrp_status(&pair.configs[0])
    );
    let s1 = lab.vrrp_status(&pair.configs[0]).unwrap();
    assert_eq!(
        s1["effective_priority"], 60,
        "110 - no_healthy_backend 50: {s1}"
    );
    assert_eq!(s1["state"], "backup");
    // It recovers when the probes do, and preempts back.
    lab.lbs[0].ns.sh("nft delete table inet lbtest");
    pair.wait_master(0, Duration::from_secs(5));
    assert_eq!(
        lab.vrrp_status(&pair.configs[0]).unwrap()["effective_priority"],
        110
    );
}

#[test]
fn unicast_peers_elect_and_fail_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, mut a1, _a2)) = start_pair(
        "vrrp_ucast",
        "unicast_src = \"198.18.0.2\"\nunicast_peers = [\"198.18.0.3\"]",
        "unicast_src = \"198.18.0.3\"\nunicast_peers = [\"198.18.0.2\"]",
    ) else {
        return;
    };
    let lab = &pair.lab;
    let client = pair.gap_client("gapucast", 4);
    std::thread::sleep(Duration::from_millis(1500));
    lab.kill_node(0, &mut a1);
    let report = client.finish(Duration::from_secs(15));
    assert_eq!(lab.vrrp_state(&pair.configs[1]), "master");
    assert!(lab.has_vip(1));
    let gap = report["max_gap_ms"].as_f64().unwrap();
    println!("unicast: client gap {gap} ms");
    assert!(gap < 1000.0, "{report}");
    let s2 = lab.vrrp_status(&pair.configs[1]).unwrap();
    assert!(s2["adverts_received"].as_u64().unwrap() > 0);
    assert!(s2["bad_packets"].as_object().unwrap().is_empty(), "{s2}");
}
