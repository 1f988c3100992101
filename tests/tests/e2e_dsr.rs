//! End to end, DSR modes, with stub apiservers set up by `lb-agent backend-setup`:
//! - two LBs with VRRP at 100 ms: 300 requests through the VIP, each on a new connection, spread over the
//!   backends, which see the client's own address; a backend whose setup is undone goes
//!   down (the VIP-path probe) and comes back when set up again; `backend-setup --undo`
//!   leaves each backend as it was;
//! - two LBs with VRRP at 100 ms: the master's node dies under 30 long-lived connections,
//!   which carry on through the backup (same Maglev pick, no flow state needed), also when
//!   a fourth backend joined before the failover (then only those whose Maglev slot moved
//!   to it are lost).

use std::{path::Path, process::Command, time::Duration};

use lb_tests::{
    lab::{assert_spread, backend_name, backend_status, bin, wait_for, Lab, CLIENT},
    vrrp_lab::{Pair, VRRP_HEALTH},
};

/// What `backend-setup` may change on a backend, to compare before and after.
fn backend_state(lab: &Lab, i: usize) -> String {
    lab.backends[i].ns.sh(
        "ip -4 -o addr show; ip -o link show | sed 's/^[0-9]*: //'; \
         tc filter show dev eth0 ingress; \
         sysctl net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce",
    )
}

/// Runs `lb-agent backend-setup --mode MODE --vip VIP` (and `extra`) on backend `i`.
fn backend_setup(lab: &Lab, i: usize, mode: &str, extra: &[&str]) -> String {
    lab.backend_setup(i, mode, extra)
        .unwrap_or_else(|e| panic!("backend-setup on {}: {e}", backend_name(i)))
}

fn three_hundred_requests(test: &str, mode: &str) {
    // Two LBs with VRRP at 100 ms, lb1 the master.
    let mut before = Vec::new();
    let Some((pair, _a1, _a2)) = Pair::build(
        test,
        100,
        ["", ""],
        3,
        3,
        &format!("mode = \"{mode}\""),
        |lab| {
            before = (0..3).map(|i| backend_state(lab, i)).collect();
            for i in 0..3 {
                backend_setup(lab, i, mode, &[]);
            }
            lab.start_stubs_any()
        },
    ) else {
        return;
    };
    let footprint = pair.lab.footprint();
    {
        let lab = &pair.lab;
        let config = &pair.configs[0];
        wait_up(lab, config, 3);

        let report = lab.loadgen("/version", &["--count", "300", "--concurrency", "4"]);
        assert_eq!(report["ok"], 300, "all requests succeed: {report}");

        let status = lab.status(config);
        let vip = &status["vips"][0];
        assert_eq!(vip["mode"], mode, "{status}");
        assert_eq!(vip["new_flows"], 300, "{status}");
        assert_eq!(vip["reply_packets"], 0, "replies bypass the LB: {status}");
        for (i, served) in assert_spread(&report, 300, 3).into_iter().enumerate() {
            let name = backend_name(i);
            let stub = lab.stub_stats(i);
            assert_eq!(
                stub["peers"][CLIENT.to_string()].as_u64().unwrap_or(0),
                served,
                "{name} sees the client's own address on each connection: {stub}"
            );
        }
        let counters = &status["counters"];
        assert!(counters["tx"].as_u64().unwrap() >= 300 * 5, "{counters}");
        for r in [
            "drop_dsr_not_on_link",
            "drop_dsr_egress",
            "drop_dsr_no_neigh",
            "drop_dsr_too_big",
        ] {
            assert_eq!(counters[r], 0, "{r}: {counters}");
        }
        assert!(status["dsr_flows"].as_u64().unwrap() > 0, "{status}");

        // A backend that loses its DSR setup still answers its probe at its own address,
        // but the VIP-path probe finds it deaf to the VIP: it goes down, and new
        // connections avoid it.
        backend_setup(lab, 0, mode, &["--undo"]);
        wait_for(Duration::from_secs(10), "master01 down", || {
            backend_status(&lab.status(config), "master01")["state"] == "down"
        });
        let b = backend_status(&lab.status(config), "master01").clone();
        let why = b["health"]["last_failure"].as_str().unwrap_or_default();
        assert!(why.contains("VIP path"), "{b}");
        println!("{mode}: master01 without its setup: {why}");
        let report = lab.loadgen("/version", &["--count", "60", "--concurrency", "4"]);
        assert_eq!(report["ok"], 60, "{report}");
        assert!(report["backends"]["master01"].is_null(), "{report}");
        backend_setup(lab, 0, mode, &[]);
        wait_for(Duration::from_secs(10), "master01 up again", || {
            backend_status(&lab.status(config), "master01")["state"] == "up"
        });

        for (i, before) in before.iter().enumerate() {
            backend_setup(lab, i, mode, &["--undo"]);
            assert_eq!(
                &backend_state(lab, i),
                before,
                "backend-setup --undo leaves {} as it was",
                backend_name(i)
            );
        }
    }
    drop(pair);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn dsr_l2_three_hundred_new_connections() {
    three_hundred_requests("e2e_dsr_l2", "dsr-l2");
}

#[test]
fn dsr_ipip_three_hundred_new_connections() {
    three_hundred_requests("e2e_dsr_ipip", "dsr-ipip");
}

/// Waits until the agent using `config` has its first `n` backends up.
fn wait_up(lab: &Lab, config: &Path, n: usize) {
    wait_for(Duration::from_secs(10), "backends up", || {
        let s = lab.status(config);
        (0..n).all(|i| {
            s["vips"][0]["backends"].as_array().is_some_and(|b| {
                b.iter()
                    .any(|b| b["name"] == backend_name(i).as_str() && b["state"] == "up")
            })
        })
    });
}

/// Two DSR LBs (VRRP adverts every 100 ms), 30 long-lived connections with a request every
/// 100 ms and a 1 s timeout; lb1's node dies. With `add_fourth`, a fourth backend joins
/// both LBs' configs (reload) first. Returns how many connections lived through it without
/// a failed request or a reconnect, and the longest request.
fn failover(test: &str, mode: &str, add_fourth: bool) -> Option<(usize, u64)> {
    let vip_extra = format!("mode = \"{mode}\"");
    let hosts = if add_fourth { 4 } else { 3 };
    let (pair, mut a1, _a2) = Pair::build(test, 100, ["", ""], hosts, 3, &vip_extra, |lab| {
        for i in 0..lab.backends.len() {
            backend_setup(lab, i, mode, &[]);
        }
        lab.start_stubs_any()
    })?;
    let lab = &pair.lab;
    for c in &pair.configs {
        wait_up(lab, c, 3);
    }
    let long = lab.spawn_long_lived_with(&format!("{test}-long"), 8, "1s");
    std::thread::sleep(Duration::from_millis(1500));
    if add_fourth {
        for (i, prio) in [(0, 110), (1, 100)] {
            let c = lab.agent_config_vrrp_vip(
                i,
                &vip_extra,
                VRRP_HEALTH,
                &Pair::vrrp(prio, 100, ""),
                4,
            );
            let out = Command::new(bin("lb-agent"))
                .args(["reload", "--config"])
                .arg(&c)
                .output()
                .expect("lb-agent reload");
            assert!(out.status.success(), "reload: {out:?}");
        }
        for c in &pair.configs {
            wait_up(lab, c, 4);
        }
        assert_eq!(
            backend_status(&lab.status(&pair.configs[1]), "master04")["state"],
            "up"
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_node(0, &mut a1);
    let report = long.finish(Duration::from_secs(30));
    pair.wait_master(1, Duration::from_secs(3));
    let conns = report["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 30);
    let survived = conns
        .iter()
        .filter(|c| c["requests_failed"] == 0 && c["reconnects"] == 0)
        .count();
    let max_ms = report["max_request_ms"].as_u64().unwrap_or(0);
    let status = lab.status(&pair.configs[1]);
    println!(
        "{test}: {survived} of 30 connections carried on; longest request {max_ms} ms; \
         lb2 adopted {} packets without a flow; report ok {} failed {} errors {}",
        status["counters"]["dsr_adopted"], report["ok"], report["failed"], report["errors"]
    );
    assert!(
        status["counters"]["dsr_adopted"].as_u64().unwrap() > 0,
        "lb2 forwarded the connections it had no flows for: {status}"
    );
    Some((survived, max_ms))
}

#[test]
fn dsr_l2_connections_survive_an_lb_failover() {
    let Some((survived, max_ms)) = failover("dsr_l2_fo", "dsr-l2", false) else {
        return;
    };
    assert_eq!(survived, 30, "every connection carries on");
    assert!(max_ms < 1000, "longest request {max_ms} ms");
}

#[test]
fn dsr_ipip_connections_survive_an_lb_failover() {
    let Some((survived, max_ms)) = failover("dsr_ipip_fo", "dsr-ipip", false) else {
        return;
    };
    assert_eq!(survived, 30, "every connection carries on");
    assert!(max_ms < 1000, "longest request {max_ms} ms");
}

/// Maglev moves about a quarter of the slots to a fourth backend, and the backup has no
/// flows to keep connections off it: those land on master04, which resets them.
fn after_a_backend_joined(test: &str, mode: &str) {
    let Some((survived, _)) = failover(test, mode, true) else {
        return;
    };
    assert!(
        (12..30).contains(&survived),
        "{survived} of 30 survived (about three quarters expected)"
    );
}

#[test]
fn dsr_l2_failover_after_a_backend_joined_loses_only_the_moved_connections() {
    after_a_backend_joined("dsr_l2_fo4", "dsr-l2");
}

#[test]
fn dsr_ipip_failover_after_a_backend_joined_loses_only_the_moved_connections() {
    after_a_backend_joined("dsr_ipip_fo4", "dsr-ipip");
}
