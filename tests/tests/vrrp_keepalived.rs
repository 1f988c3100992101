//! lb-agent and keepalived (Debian's 2.2) in one VRRP group, both ways round, for v2 with
//! `auth_type PASS` and for v3: the right node holds the VIP after start, after the master
//! is killed and after it returns. This is what a migration one node at a time relies on.

use std::{path::PathBuf, sync::Mutex, time::Duration};

use lb_tests::{
    lab::{Lab, Proc},
    vrrp_lab::{keepalived_conf, poll_until},
};

static SERIAL: Mutex<()> = Mutex::new(());

struct Case {
    version: u8,
    /// keepalived's advert_int and ours.
    advert_ka: &'static str,
    advert_lb: &'static str,
    auth: Option<&'static str>,
}

const V2: Case = Case {
    version: 2,
    advert_ka: "1",
    advert_lb: "1s",
    auth: Some("pass1122"),
};
const V3: Case = Case {
    version: 3,
    advert_ka: "0.1",
    advert_lb: "100ms",
    auth: None,
};

fn agent_vrrp(c: &Case, priority: u8) -> String {
    let mut s = format!(
        "virtual_router_id = 51\npriority = {priority}\nversion = {}\nadvert_interval = \"{}\"\n",
        c.version, c.advert_lb
    );
    if let Some(p) = c.auth {
        s.push_str(&format!("auth_pass = \"{p}\"\n"));
    }
    s
}

/// How long a takeover may take: 3 adverts plus skew, plus slack for a busy machine.
fn patience(c: &Case) -> Duration {
    if c.version == 2 {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(3)
    }
}

fn holds(lab: &Lab, i: usize, timeout: Duration, what: &str) {
    let ok = poll_until(timeout, || lab.has_vip(i) && !lab.has_vip(1 - i));
    assert!(
        ok.is_some(),
        "{what}: lb{} should hold the VIP alone (lb1 {}, lb2 {})",
        i + 1,
        lab.has_vip(0),
        lab.has_vip(1)
    );
}

/// keepalived master on lb1 (110), lb-agent backup on lb2 (100).
fn keepalived_master(c: &Case, tag: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new(tag, 2, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let ka_conf = keepalived_conf(c.version, "MASTER", 110, c.advert_ka, c.auth);
    let mut ka = lab.start_keepalived(0, &ka_conf);
    let cfg: PathBuf = lab.agent_config_vrrp(1, "interval = \"500ms\"", &agent_vrrp(c, 100));
    let _agent = lab.start_agent(1, &cfg);
    holds(&lab, 0, patience(c), "after start");
    let ok = poll_until(patience(c), || lab.vrrp_state(&cfg) == "backup");
    assert!(
        ok.is_some(),
        "agent backup: {:?}\nkeepalived:\n{}",
        lab.vrrp_status(&cfg),
        ka.output()
    );
    let s = lab.vrrp_status(&cfg).unwrap();
    assert_eq!(s["master"], "198.18.0.2", "agent hears keepalived: {s}");
    assert!(
        s["bad_packets"].as_object().unwrap().is_empty(),
        "keepalived's adverts accepted: {s}"
    );

    lab.kill_node(0, &mut ka);
    holds(&lab, 1, patience(c), "after keepalived is killed");
    assert_eq!(lab.vrrp_state(&cfg), "master");

    lab.revive_node(0);
    let ka2: Proc = lab.start_keepalived(0, &ka_conf);
    holds(
        &lab,
        0,
        patience(c) * 2,
        "after keepalived returns (it preempts)",
    );
    let ok = poll_until(patience(c), || lab.vrrp_state(&cfg) == "backup");
    assert!(
        ok.is_some(),
        "agent stepped down: {:?}\n{}",
        lab.vrrp_status(&cfg),
        ka2.output()
    );
}

/// lb-agent master on lb1 (110), keepalived backup on lb2 (100).
fn agent_master(c: &Case, tag: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new(tag, 2, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let cfg = lab.agent_config_vrrp(0, "interval = \"500ms\"", &agent_vrrp(c, 110));
    let mut agent = lab.start_agent(0, &cfg);
    let ka_conf = keepalived_conf(c.version, "BACKUP", 100, c.advert_ka, c.auth);
    let ka = lab.start_keepalived(1, &ka_conf);
    holds(&lab, 0, patience(c), "after start");
    assert_eq!(lab.vrrp_state(&cfg), "master");
    // keepalived stays backup: it accepted our adverts.
    std::thread::sleep(patience(c) / 2);
    assert!(
        !lab.has_vip(1),
        "keepalived took the VIP: our adverts were rejected?\n{}",
        ka.output()
    );

    lab.kill_node(0, &mut agent);
    let ok = poll_until(patience(c), || lab.has_vip(1));
    assert!(
        ok.is_some(),
        "keepalived took over after the agent died\n{}",
        ka.output()
    );

    lab.revive_node(0);
    let _agent = lab.start_agent(0, &cfg);
    holds(
        &lab,
        0,
        patience(c) * 2,
        "after the agent returns (it preempts)",
    );
    assert_eq!(lab.vrrp_state(&cfg), "master");
}

#[test]
fn v3_keepalived_master_agent_backup() {
    keepalived_master(&V3, "ka3m");
}

#[test]
fn v3_agent_master_keepalived_backup() {
    agent_master(&V3, "ka3b");
}

#[test]
fn v2_auth_pass_keepalived_master_agent_backup() {
    keepalived_master(&V2, "ka2m");
}

#[test]
fn v2_auth_pass_agent_master_keepalived_backup() {
    agent_master(&V2, "ka2b");
}

#[test]
fn a_peer_with_another_password_is_logged_with_its_address() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = Lab::new("ka_auth", 2, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    let c = &V2;
    let cfg = lab.agent_config_vrrp(0, "interval = \"500ms\"", &agent_vrrp(c, 110));
    let agent = lab.start_agent(0, &cfg);
    // keepalived's password differs: each ignores the other, which is a dual master unless
    // someone reads the logs.
    let ka_conf = keepalived_conf(c.version, "BACKUP", 100, c.advert_ka, Some("other"));
    let _ka = lab.start_keepalived(1, &ka_conf);
    let seen = poll_until(Duration::from_secs(5), || {
        lab.vrrp_status(&cfg)
            .is_some_and(|s| s["bad_packets"]["auth_mismatch"].as_u64().unwrap_or(0) > 0)
    });
    assert!(seen.is_some(), "{:?}", lab.vrrp_status(&cfg));
    let log = agent.output();
    let line = log
        .lines()
        .find(|l| l.contains("rejected a packet from 198.18.0.3: auth_mismatch"))
        .unwrap_or_else(|| panic!("rejection not logged:\n{log}"));
    println!("{line}");
    // Rate-limited: one line per sender and reason per 10 s, not one per advert.
    std::thread::sleep(Duration::from_secs(3));
    let n = agent
        .output()
        .lines()
        .filter(|l| l.contains("rejected a packet from 198.18.0.3"))
        .count();
    assert_eq!(n, 1, "{}", agent.output());
}
