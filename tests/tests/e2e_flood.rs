//! Floods do not deny service (issue #10). One LB (NAT, HTTPS probes), three stub apiservers
//! and 30 long-lived connections; then a spoofed SYN flood and a stray-ACK flood of at least
//! 50,000 packets/s each (lb-flood, from the client's namespace). New connections from the legitimate client: at least 99% succeed during
//! each flood and all of them after it; no request on the long-lived connections fails.
//! 5 s per flood by default; LB_FLOOD_SECS=20 gives the acceptance run.

use std::{path::Path, time::Duration};

use lb_tests::{
    flood::MAX_DURATION,
    lab::{backend_name, backend_status, bin, wait_for, Lab, CLIENT, VIP, VIP_PORT},
    netns::Netns,
};
use serde_json::Value;

/// The issue's floor for the flood rate, packets per second.
const ISSUE_RATE: f64 = 50_000.0;
/// What each flood aims for: a little above the issue's floor, so that pacing losses on a
/// busy host still leave the achieved rate at or above it.
const RATE: u64 = 52_000;
/// Below this the flooder is broken, not the VM slow: the test fails.
const RATE_FLOOR: f64 = 20_000.0;
/// Seconds of new connections measured after each flood.
const AFTER_SECS: u64 = 3;
/// Pause between a flood's end and the "after" measurement, so frames still queued in the
/// veths and the bridge are not counted as "after".
const SETTLE: Duration = Duration::from_secs(1);
/// New connections per second the legitimate client opens, whatever became of the earlier
/// ones: a failure weighs in the ratio as often as it happens.
const CLIENT_RATE: u64 = 50;

fn flood_secs() -> u64 {
    let secs = std::env::var("LB_FLOOD_SECS")
        .ok()
        .map(|s| s.parse::<u64>().expect("LB_FLOOD_SECS: whole seconds"))
        .unwrap_or(5);
    assert!(
        (3..=MAX_DURATION.as_secs()).contains(&secs),
        "LB_FLOOD_SECS must be 3..={}",
        MAX_DURATION.as_secs()
    );
    secs
}

/// What one flood did and what the legitimate client saw.
struct Phase {
    mode: &'static str,
    flood: Value,
    /// Frames the LB's interface received while the flood ran (all traffic, flood included).
    lb_rx: u64,
    /// lb-loadgen's report on new connections opened under the flood.
    during: Value,
    /// lb-loadgen's report on new connections opened after it.
    after: Value,
    /// The LB's non-zero counters when the flood ended.
    counters: Value,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.flood["rate"].as_f64().expect("flood rate")
    }

    fn sent(&self) -> u64 {
        self.flood["sent"].as_u64().expect("flood sent")
    }
}

fn success(report: &Value) -> (u64, u64) {
    let ok = report["ok"].as_u64().expect("ok");
    (ok, ok + report["failed"].as_u64().expect("failed"))
}

fn lb_rx_packets(lab: &Lab) -> u64 {
    lab.lbs[0]
        .ns
        .sh("cat /sys/class/net/eth0/statistics/rx_packets")
        .trim()
        .parse()
        .expect("rx_packets")
}

/// The counters that moved: what the data plane did with the flood, without the noise.
fn nonzero(counters: &Value) -> Value {
    let mut c = counters.as_object().expect("counters").clone();
    c.retain(|_, v| v.as_u64() != Some(0));
    Value::Object(c)
}

fn mac(ns: &Netns) -> String {
    ns.sh("cat /sys/class/net/eth0/address").trim().to_string()
}

/// Floods in `mode` ("syn" or "ack") for `secs` while the client opens new connections, then
/// measures new connections after it.
fn phase(lab: &Lab, config: &Path, mode: &'static str, secs: u64) -> Phase {
    let flooder = bin("lb-flood");
    let (dst_mac, src_mac) = (mac(&lab.lbs[0].ns), mac(&lab.client.ns));
    let (vip, port, rate) = (VIP.to_string(), VIP_PORT.to_string(), RATE.to_string());
    let (duration, max) = (secs.to_string(), (RATE * secs).to_string());
    let client = CLIENT.to_string();
    let mut args = vec![
        flooder.to_str().unwrap(),
        if mode == "syn" { "--syn" } else { "--ack" },
        "--interface",
        "eth0",
        "--dst-mac",
        &dst_mac,
        "--src-mac",
        &src_mac,
        "--vip",
        &vip,
        "--port",
        &port,
        "--rate",
        &rate,
        "--duration",
        &duration,
        "--max-packets",
        &max,
    ];
    if mode == "ack" {
        args.extend(["--src", &client]);
    }
    let rx0 = lb_rx_packets(lab);
    let mut flood = lab.spawn(&lab.client, &format!("flood-{mode}"), &args);
    // The client starts once the flood is on and stops before it ends: every one of its
    // connections is opened under the flood.
    std::thread::sleep(Duration::from_millis(500));
    let during = lab.spawn_loadgen(
        &format!("during-{mode}"),
        "/version",
        &[
            "--count",
            &(CLIENT_RATE * (secs - 1)).to_string(),
            "--rate",
            &CLIENT_RATE.to_string(),
        ],
    );
    let during = during.finish(Duration::from_secs(secs + 10));
    let st = flood
        .wait(Duration::from_secs(secs + 10))
        .unwrap_or_else(|| panic!("lb-flood --{mode} outlived its duration"));
    let out = flood.output();
    assert!(st.success(), "lb-flood --{mode}: {st}\n{out}");
    let report = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report from lb-flood --{mode}:\n{out}"));
    let flood: Value = serde_json::from_str(report).expect("lb-flood report");
    let lb_rx = lb_rx_packets(lab) - rx0;
    let counters = nonzero(&lab.status(config)["counters"]);
    std::thread::sleep(SETTLE);
    let after = lab.loadgen(
        "/version",
        &[
            "--count",
            &(CLIENT_RATE * AFTER_SECS).to_string(),
            "--rate",
            &CLIENT_RATE.to_string(),
        ],
    );
    Phase {
        mode,
        flood,
        lb_rx,
        during,
        after,
        counters,
    }
}

#[test]
fn syn_and_ack_floods_do_not_deny_service() {
    let Some(lab) = Lab::new("e2e_flood", 1, 3) else {
        return;
    };
    let footprint = lab.footprint();
    let secs = flood_secs();
    {
        let _stubs = lab.start_stubs();
        lab.add_vip(0);
        // The default HTTPS probes (1 s, 500 ms timeout, rise 2, fall 2): a flood that starves
        // them marks backends down and breaks the long-lived connections, as in production.
        let config = lab.agent_config(0, "", "");
        let _agent = lab.start_agent(0, &config);
        wait_for(Duration::from_secs(15), "all backends up", || {
            let s = lab.status(&config);
            (0..3).all(|i| backend_status(&s, &backend_name(i))["state"] == "up")
        });
        // Both phases plus a margin for the starts and the settling pauses.
        let long_secs = 2 * (secs + SETTLE.as_secs() + AFTER_SECS) + 6;
        let long = lab.spawn_long_lived("long", long_secs);
        std::thread::sleep(Duration::from_secs(1));

        let phases = [
            phase(&lab, &config, "syn", secs),
            phase(&lab, &config, "ack", secs),
        ];
        let long = long.finish(Duration::from_secs(long_secs + 15));
        let status = lab.status(&config);

        // Every figure first, so a failing run still reports what it measured.
        for p in &phases {
            let (d_ok, d_all) = success(&p.during);
            let (a_ok, a_all) = success(&p.after);
            eprintln!(
                "{} flood: {} packets in {:.2} s = {:.0}/s ({} the issue's {ISSUE_RATE}/s; target \
                 {RATE}/s, {} refused by the sender's kernel); LB eth0 received {} frames \
                 meanwhile ({:.0}/s)",
                p.mode.to_uppercase(),
                p.sent(),
                p.flood["seconds"],
                p.rate(),
                if p.rate() >= ISSUE_RATE {
                    "meets"
                } else {
                    "BELOW"
                },
                p.flood["refused"],
                p.lb_rx,
                p.lb_rx as f64 / p.flood["seconds"].as_f64().unwrap(),
            );
            eprintln!(
                "  new connections during: {d_ok}/{d_all} ({:.2}%), errors {}; after: \
                 {a_ok}/{a_all}, errors {}",
                100.0 * d_ok as f64 / d_all.max(1) as f64,
                p.during["errors"],
                p.after["errors"]
            );
            eprintln!("  LB counters at the flood's end: {}", p.counters);
        }
        eprintln!(
            "long-lived: {} requests ok, {} failed, errors {}",
            long["ok"], long["failed"], long["errors"]
        );
        eprintln!("LB counters at the end: {}", nonzero(&status["counters"]));

        for p in &phases {
            let m = p.mode;
            assert!(
                p.rate() >= RATE_FLOOR,
                "{m} flood reached {:.0}/s only: {}",
                p.rate(),
                p.flood
            );
            // The frames reached the LB: not lost in the client or the bridge.
            assert!(
                p.lb_rx >= p.sent() * 9 / 10,
                "{m} flood: {} sent, the LB received {}",
                p.sent(),
                p.lb_rx
            );
            let (d_ok, d_all) = success(&p.during);
            assert!(
                d_ok * 100 >= d_all * 99,
                "{m} flood: {d_ok}/{d_all} new connections succeeded during it: {}",
                p.during
            );
            assert_eq!(d_all, CLIENT_RATE * (secs - 1), "{m} flood: {}", p.during);
            let (a_ok, a_all) = success(&p.after);
            assert!(
                a_ok == a_all,
                "{m} flood: {a_ok}/{a_all} new connections succeeded after it: {}",
                p.after
            );
            assert_eq!(a_all, CLIENT_RATE * AFTER_SECS, "{m} flood: {}", p.after);
        }
        assert_eq!(long["failed"], 0, "long-lived requests failed: {long}");
        let long_ok = long["ok"].as_u64().unwrap();
        // 30 connections, one request each per 100 ms: at least half of that pace.
        assert!(
            long_ok >= 30 * 10 * long_secs / 2,
            "long-lived connections served {long_ok} requests in {long_secs} s: {long}"
        );
    }
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
