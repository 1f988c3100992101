//! The agent fails safe: no fault of the agent or the host leaves the VIP blackholed,
//! doubled, or silently unmanaged. SIGHUP (a reload, never a stop); a master SIGKILLed with its link up; the VRRP task
//! failing; link down/up and a VIP removed by hand; a failed map write and a tampered map.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{bin, Lab, Proc, VIP},
    vrrp_lab::{poll_until, Pair},
};
use nix::sys::signal::Signal;

/// These tests measure failover timing: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const ADVERT_MS: u64 = 100;

fn agent_cmd(args: &[&str], config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(bin("lb-agent"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run lb-agent")
}

/// Sets failpoint `name` to `actions` in the agent that uses `config`.
fn failpoint(config: &std::path::Path, name: &str, actions: &str) {
    let out = agent_cmd(&["debug", "failpoint", name, actions], config);
    assert!(
        out.status.success(),
        "failpoints need `cargo xtask test` (feature lb-agent/failpoints): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// After lb1's agent was made to fail at `t0`: its exit code, how long it took to exit,
/// and when lb2 alone held the VIP.
fn exit_and_handover(
    pair: &Pair,
    a1: &mut Proc,
    t0: Instant,
) -> (Option<i32>, Duration, Option<Duration>) {
    let code = exit_code(a1, Duration::from_secs(10));
    let exited = t0.elapsed();
    let lab = &pair.lab;
    let took =
        poll_until(Duration::from_secs(3), || lab.has_vip(1) && !lab.has_vip(0)).map(|t| t - t0);
    (code, exited, took)
}

/// Waits up to `timeout` for `p` to exit and returns its exit code.
fn exit_code(p: &mut Proc, timeout: Duration) -> Option<i32> {
    p.wait(timeout).map(|s| s.code().unwrap_or(-1))
}

#[test]
fn sighup_reloads_and_never_kills_even_with_a_broken_config() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new("fs_hup", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    lab.add_vip(0);
    let config = lab.agent_config(0, "", "interval = \"200ms\"\ntimeout = \"150ms\"");
    let mut agent = lab.start_agent(0, &config);
    let pid_before = lab.status(&config)["agent"]["pid"].clone();
    let good = std::fs::read_to_string(&config).unwrap();
    for round in 0..3 {
        if round == 1 {
            // A config being edited: refused, and the agent keeps running its old one.
            std::fs::write(&config, "[agent]\ninterface = ").unwrap();
        } else {
            std::fs::write(&config, &good).unwrap();
        }
        agent.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        agent.running(),
        "SIGHUP killed the agent:\n{}",
        agent.output()
    );
    let s = lab.status(&config);
    assert_eq!(s["agent"]["running"], true);
    assert_eq!(s["agent"]["pid"], pid_before);
    assert_eq!(s["agent"]["xdp_mode"], "native", "still attached: {s}");
    let report = lab.loadgen("/version", &["--count", "30", "--concurrency", "2"]);
    assert_eq!(report["ok"], 30, "still serving: {report}");
    let log = agent.output();
    assert_eq!(log.matches("SIGHUP: reloading").count(), 3, "{log}");
    assert!(log.contains("reload: no changes"), "{log}");
    assert!(
        log.contains("reload refused, the agent keeps its config:"),
        "{log}"
    );
    // SIGTERM stays the orderly stop.
    let st = agent.terminate(Duration::from_secs(10)).expect("stops");
    assert!(st.success(), "{st}\n{}", agent.output());
    assert!(!lab.pin_path(0).exists());
}

#[test]
fn a_master_killed_with_its_link_up_loses_the_vip_by_itself() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, a1, _a2)) = Pair::new("fs_crash", ADVERT_MS, "", "") else {
        return;
    };
    let lab = &pair.lab;
    let client = pair.gap_client("gapcrash", 5);
    std::thread::sleep(Duration::from_millis(1500));
    // The agent dies (OOM killer, a bug); the host and its link stay up; nobody cleans up.
    let t0 = Instant::now();
    a1.signal(Signal::SIGKILL);
    let only_lb2 =
        poll_until(Duration::from_secs(5), || lab.has_vip(1) && !lab.has_vip(0)).map(|t| t - t0);
    let report = client.finish(Duration::from_secs(20));
    let gap = report["max_gap_ms"].as_f64().unwrap();
    println!(
        "SIGKILL, link up: VIP on lb2 only after {only_lb2:?}; client gap {gap} ms ({} ok, {} failed: {})",
        report["ok"], report["failed"], report["errors"]
    );
    let only_lb2 = only_lb2.expect("the dead master's VIP never went away");
    assert!(
        only_lb2 <= Duration::from_secs(2),
        "VIP on lb2 only after {only_lb2:?}"
    );
    assert!(
        gap < 1000.0,
        "clients' new connections resumed after {gap} ms: {report}"
    );
    assert_eq!(lab.vrrp_state(&pair.configs[1]), "master");
    // And it stays that way: nothing re-adds it on the dead host.
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.has_vip(1) && !lab.has_vip(0));
}

#[test]
fn a_failed_vrrp_task_gives_up_the_vip_and_the_agent_exits_non_zero() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, mut a1, _a2)) = Pair::new("fs_vrrpfail", ADVERT_MS, "", "") else {
        return;
    };
    let lab = &pair.lab;
    let client = pair.gap_client("gapvrrpfail", 4);
    std::thread::sleep(Duration::from_millis(1000));
    let t0 = Instant::now();
    failpoint(&pair.configs[0], "vrrp-loop", "panic");
    let (code, exited, took) = exit_and_handover(&pair, &mut a1, t0);
    let report = client.finish(Duration::from_secs(20));
    let log = a1.output();
    println!(
        "VRRP task panicked: agent exited with {code:?} after {exited:?}; VIP on lb2 only after {took:?}; client gap {} ms",
        report["max_gap_ms"]
    );
    assert!(
        matches!(code, Some(c) if c != 0),
        "the agent must exit non-zero, got {code:?}:\n{log}"
    );
    assert!(log.contains("task vrrp"), "logs why:\n{log}");
    assert!(log.contains("priority 0 advert"), "resigns:\n{log}");
    let took = took.expect("lb2 took the VIP");
    // A priority 0 advert hands over within lb2's skew time, not 3 intervals.
    assert!(took < Duration::from_millis(1000), "{took:?}");
    assert_eq!(lab.vrrp_state(&pair.configs[1]), "master");
    assert!(!lab.pin_path(0).exists(), "detached and cleaned up");
    let link = lab.lbs[0].ns.sh("ip -o link show eth0");
    assert!(!link.contains("xdp"), "XDP detached: {link}");
    assert!(report["max_gap_ms"].as_f64().unwrap() < 1000.0, "{report}");
}

#[test]
fn a_failed_keeper_makes_vrrp_resign_in_order_and_the_agent_exit_non_zero() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, mut a1, _a2)) = Pair::new("fs_keeperfail", ADVERT_MS, "", "") else {
        return;
    };
    let lab = &pair.lab;
    let t0 = Instant::now();
    failpoint(&pair.configs[0], "keeper-loop", "panic");
    // The keeper only turns its loop on an event: a probe result comes within 200 ms.
    let (code, _, took) = exit_and_handover(&pair, &mut a1, t0);
    let log = a1.output();
    println!("keeper panicked: agent exited with {code:?}; VIP on lb2 only after {took:?}");
    assert!(matches!(code, Some(c) if c != 0), "{code:?}:\n{log}");
    assert!(log.contains("task keeper panicked"), "{log}");
    assert!(
        log.contains("VRRP: resigning: priority 0 advert"),
        "the VRRP thread resigned itself:\n{log}"
    );
    assert!(took.expect("lb2 took over") < Duration::from_secs(1));
    assert_eq!(lab.vrrp_state(&pair.configs[1]), "master");
}

#[test]
fn link_down_faults_at_once_and_a_vip_removed_by_hand_comes_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // keepalived-style notify scripts on lb1 record every transition.
    let dir = std::env::temp_dir().join(format!("lb-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("notify.log");
    let script = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body} >> {}\n", log.display())).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p.display().to_string()
    };
    let notify = script("notify.sh", "echo \"notify $*\"");
    let to_master = script("master.sh", "echo \"master $*\"");
    let extra = format!("notify = \"{notify}\"\nnotify_master = \"{to_master} VG_1\"");
    let Some((pair, a1, _a2)) = Pair::new("fs_link", ADVERT_MS, &extra, "") else {
        return;
    };
    let lab = &pair.lab;

    // Something else removes the VIP from the master: it is put back and logged.
    let t0 = Instant::now();
    lab.lbs[0].ns.sh(&format!("ip addr del {VIP}/32 dev eth0"));
    let back = poll_until(Duration::from_secs(2), || lab.has_vip(0)).map(|t| t - t0);
    println!("VIP removed by hand: back after {back:?}");
    assert!(back.expect("VIP added back") < Duration::from_millis(500));
    // Put back on the kernel's event, not by the next 200 ms refresh, and said so.
    let said = poll_until(Duration::from_secs(1), || {
        a1.output()
            .contains("virtual address 198.18.0.100/32 disappeared from eth0 while master")
    });
    assert!(said.is_some(), "{}", a1.output());
    assert_eq!(lab.vrrp_state(&pair.configs[0]), "master");
    assert_eq!(
        lab.vrrp_state(&pair.configs[1]),
        "backup",
        "no failover for that"
    );
    // The address carries a lifetime the agent keeps renewing.
    let addr = lab.lbs[0].ns.sh("ip -4 -o addr show dev eth0");
    assert!(
        addr.lines()
            .any(|l| l.contains(&VIP.to_string()) && l.contains("valid_lft 1sec")),
        "{addr}"
    );

    // The master's link goes down: fault at once, the backup takes over.
    let t0 = Instant::now();
    lab.lbs[0].ns.sh("ip link set eth0 down");
    let fault = poll_until(Duration::from_secs(2), || {
        lab.vrrp_state(&pair.configs[0]) == "fault"
    })
    .map(|t| t - t0);
    println!("link down: fault after {fault:?}");
    assert!(fault.expect("fault state") < Duration::from_millis(500));
    let s = lab.vrrp_status(&pair.configs[0]).unwrap();
    assert_eq!(s["fault_reason"], "interface down", "{s}");
    assert_eq!(s["effective_priority"], 0, "{s}");
    assert!(!lab.has_vip(0), "a faulted master drops the VIP");
    pair.wait_master(1, Duration::from_secs(3));

    // Back up: lb1 leaves fault and, with preempt, takes the VIP back.
    lab.lbs[0].ns.sh("ip link set eth0 up");
    pair.wait_master(0, Duration::from_secs(5));
    assert!(lab.vrrp_status(&pair.configs[0]).unwrap()["fault_reason"].is_null());
    // keepalived's arguments, the specific script before `notify`, in transition order.
    std::thread::sleep(Duration::from_millis(300));
    let got = std::fs::read_to_string(&log).unwrap_or_default();
    println!("notify log:\n{got}");
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "notify INSTANCE VI_1 BACKUP 110",
            "master VG_1",
            "notify INSTANCE VI_1 MASTER 110",
            "notify INSTANCE VI_1 FAULT 0",
        ],
        "{got}"
    );
    // Back from fault as backup, with whatever tracking took off while the link was down
    // (its probes failed too), then master again.
    assert!(
        lines[4].starts_with("notify INSTANCE VI_1 BACKUP "),
        "{got}"
    );
    assert_eq!(
        lines[5..],
        ["master VG_1", "notify INSTANCE VI_1 MASTER 110"],
        "{got}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_map_write_is_retried_and_a_tampered_map_is_repaired() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new("fs_maps", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    lab.add_vip(0);
    let config = lab.agent_config(0, "", "interval = \"200ms\"\ntimeout = \"150ms\"");
    let plain = std::fs::read_to_string(&config).unwrap();
    let reconcile_every = |d: &str| {
        std::fs::write(
            &config,
            plain.replace(
                "[agent]\n",
                &format!("[agent]\nreconcile_interval = \"{d}\"\n"),
            ),
        )
        .unwrap()
    };
    // A periodic reconcile far away: what repairs the failed write below is its retry.
    reconcile_every("60s");
    let mut agent = lab.start_agent(0, &config);
    let up = poll_until(Duration::from_secs(10), || {
        lab.status(&config)["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "up")
    });
    assert!(up.is_some(), "{}", lab.status(&config));

    // The next map write fails once: the drain is recorded, retried, and lands.
    failpoint(&config, "map-write", "1*return");
    let out = agent_cmd(&["drain", "kube-apiserver", "master03"], &config);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("the map write failed"), "{said}");
    let landed = poll_until(Duration::from_millis(800), || {
        let s = lab.status(&config);
        s["vips"][0]["backends"][2]["state"] == "drain" && s["vips"][0]["backends"][2]["slots"] == 0
    });
    let s = lab.status(&config);
    assert!(landed.is_some(), "the failed write was never repaired: {s}");
    assert!(
        s["agent"]["map_write_failures"].as_u64().unwrap() >= 1,
        "{s}"
    );
    assert!(s["agent"]["map_repairs"].as_u64().unwrap() >= 1, "{s}");
    let report = lab.loadgen("/version", &["--count", "60", "--concurrency", "2"]);
    assert_eq!(report["ok"], 60, "{report}");
    assert!(
        report["backends"]["master03"].is_null(),
        "drained: {report}"
    );

    // Someone (a stray bpftool, a bug) deletes the VIP's entry and marks a backend down:
    // the periodic reconcile puts both back within its interval.
    assert!(agent
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    reconcile_every("1s");
    let _agent = lab.start_agent(0, &config);
    let up = poll_until(Duration::from_secs(10), || {
        lab.status(&config)["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "up")
    });
    assert!(up.is_some());
    let repairs_before = lab.status(&config)["agent"]["map_repairs"]
        .as_u64()
        .unwrap();
    {
        let mut maps = lb_agent::dataplane::pinned::PinnedMaps::open(&lab.pin_path(0)).unwrap();
        let (key, _) = maps.vips.iter().next().unwrap().unwrap();
        maps.vips.remove(&key).unwrap();
        let mut b0 = maps.backends.get(&0, 0).unwrap();
        b0.state = lb_common::state::DOWN;
        maps.backends.set(0, b0, 0).unwrap();
    }
    let repaired = poll_until(Duration::from_secs(4), || {
        let s = lab.status(&config);
        s["vips"].as_array().is_some_and(|v| !v.is_empty())
            && s["vips"][0]["backends"][0]["state"] == "up"
    });
    let s = lab.status(&config);
    assert!(repaired.is_some(), "not repaired: {s}");
    let repairs = s["agent"]["map_repairs"].as_u64().unwrap();
    assert!(repairs >= repairs_before + 2, "{s}");
    println!(
        "repairs: {repairs} (last: {}), write failures {}",
        s["agent"]["last_map_repair"], s["agent"]["map_write_failures"]
    );
    let report = lab.loadgen("/version", &["--count", "30", "--concurrency", "2"]);
    assert_eq!(report["ok"], 30, "serving again: {report}");
}

#[test]
fn failing_to_add_the_vip_is_a_fault_with_priority_0_not_a_master_without_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, a1, _a2)) = Pair::new("fs_addfail", ADVERT_MS, "", "") else {
        return;
    };
    let lab = &pair.lab;
    // From now on lb1 cannot add or refresh its addresses.
    failpoint(&pair.configs[0], "vrrp-add-address", "return");
    let t0 = Instant::now();
    let fault = poll_until(Duration::from_secs(3), || {
        lab.vrrp_state(&pair.configs[0]) == "fault"
    })
    .map(|t| t - t0);
    let s = lab.vrrp_status(&pair.configs[0]).unwrap();
    println!(
        "address add failing: fault after {fault:?}: {}",
        s["fault_reason"]
    );
    assert!(fault.is_some(), "{s}");
    assert_eq!(s["effective_priority"], 0, "{s}");
    assert!(
        s["fault_reason"].as_str().unwrap().contains("injected"),
        "{s}"
    );
    pair.wait_master(1, Duration::from_secs(3));
    assert!(
        a1.output().contains("cannot hold the virtual addresses"),
        "{}",
        a1.output()
    );
    // Adding works again: lb1 retries, comes back as backup and (preempt) as master.
    failpoint(&pair.configs[0], "vrrp-add-address", "off");
    pair.wait_master(0, Duration::from_secs(8));
}

#[test]
fn a_healed_split_brain_moves_clients_back_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((pair, _a1, _a2)) = Pair::new("fs_split", ADVERT_MS, "", "") else {
        return;
    };
    let lab = &pair.lab;
    let lb1 = lb_tests::vrrp_lab::mac_text(lab.lb_mac(0));
    let lb2 = lb_tests::vrrp_lab::mac_text(lab.lb_mac(1));
    // The second round of gratuitous ARPs after becoming master (5 s) must be over, or it
    // rather than the healing would move the client.
    std::thread::sleep(Duration::from_secs(5));
    let report = lab.loadgen("/version", &["--count", "5"]);
    assert_eq!(report["ok"], 5);
    assert_eq!(lab.client_vip_mac().as_deref(), Some(lb1.as_str()));
    // The LBs stop hearing each other (a partition between them only): lb2 becomes master
    // too and its gratuitous ARPs pull the client over.
    for lb in &lab.lbs {
        lb.ns.sh("nft add table ip lbsplit && \
             nft add chain ip lbsplit in '{ type filter hook input priority 0; }' && \
             nft add rule ip lbsplit in ip protocol 112 drop");
    }
    let split = poll_until(Duration::from_secs(3), || {
        lab.vrrp_state(&pair.configs[1]) == "master"
            && lab.client_vip_mac().as_deref() == Some(lb2.as_str())
    });
    assert!(
        split.is_some(),
        "no split brain: {:?}",
        lab.client_vip_mac()
    );
    // The partition heals: lb1 hears lb2's lower priority, answers, and announces itself
    // again (garp_lower_prio_repeat), so the client comes back at once.
    let t0 = Instant::now();
    for lb in &lab.lbs {
        lb.ns.sh("nft delete table ip lbsplit");
    }
    let healed = poll_until(Duration::from_secs(3), || {
        lab.client_vip_mac().as_deref() == Some(lb1.as_str())
            && lab.vrrp_state(&pair.configs[1]) == "backup"
    })
    .map(|t| t - t0);
    println!("split brain healed: client back on lb1 after {healed:?}");
    assert!(
        healed.is_some_and(|d| d < Duration::from_secs(1)),
        "client still on {:?}",
        lab.client_vip_mac()
    );
    pair.wait_master(0, Duration::from_secs(2));
}

#[test]
fn garp_refresh_re_announces_the_vip_while_master() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new("fs_refresh", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let config = lab.agent_config_vrrp(
        0,
        "interval = \"200ms\"\ntimeout = \"150ms\"",
        &Pair::vrrp(100, ADVERT_MS, "garp_refresh = \"1s\"\ngarp_count = 1"),
    );
    let _agent = lab.start_agent(0, &config);
    let master = poll_until(Duration::from_secs(5), || {
        lab.vrrp_state(&config) == "master"
    });
    assert!(master.is_some());
    // Past the takeover's two rounds (at once and 5 s later): what follows is refresh only.
    std::thread::sleep(Duration::from_millis(5500));
    let garps = lb_tests::vrrp_lab::capture_garps(&lab.client.ns, VIP, Duration::from_millis(3500));
    println!("garp_refresh 1s: {} GARPs in 3.5 s", garps.len());
    assert!((3..=4).contains(&garps.len()), "{garps:?}");
    assert!(garps.iter().all(|(_, m)| *m == lab.lb_mac(0)), "{garps:?}");
}

#[test]
fn the_address_owner_never_removes_its_own_address() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new("fs_owner", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    // The VIP is the interface's own (permanent) address: priority 255 is legitimate.
    lab.add_vip(0);
    let config = lab.agent_config_vrrp(
        0,
        "interval = \"200ms\"\ntimeout = \"150ms\"",
        &Pair::vrrp(255, ADVERT_MS, ""),
    );
    let mut agent = lab.start_agent(0, &config);
    let master = poll_until(Duration::from_secs(2), || {
        lab.vrrp_state(&config) == "master"
    });
    assert!(
        master.is_some(),
        "the owner is master at once: {}",
        agent.output()
    );
    let addr = lab.lbs[0].ns.sh("ip -4 -o addr show dev eth0");
    assert!(
        addr.lines()
            .any(|l| l.contains(&format!("inet {VIP}/32")) && l.contains("valid_lft forever")),
        "no lifetime on the owner's own address: {addr}"
    );
    let report = lab.loadgen("/version", &["--count", "10"]);
    assert_eq!(report["ok"], 10, "{report}");
    assert!(agent
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    assert!(lab.has_vip(0), "the owner's address outlives the agent");
}
