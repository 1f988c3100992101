//! How the agent attaches to a veth: `xdp_mode = "generic"` is refused (generic mode would
//! corrupt the TCP checksums of CHECKSUM_PARTIAL packets there), `auto` takes native mode and
//! never falls back to generic; and VLAN_DEVS follows link changes after the start.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use lb_agent::dataplane::pinned::PinnedMaps;
use lb_common::VlanDev;
use lb_tests::lab::{bin, wait_for, Host, Lab};

/// A command's exit status and stderr; the command is killed if it outlives `timeout`.
struct Finished {
    status: ExitStatus,
    stderr: String,
}

/// Kills the child when dropped (a test that fails mid-way leaves no agent running).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `lb-agent <cmd> --config <config>` in `host`'s network namespace (host mounts, so
/// its pins are the ones this test sees) and waits for it to end.
fn agent_in(lab: &Lab, host: &Host, cmd: &str, config: &Path, timeout: Duration) -> Finished {
    let err = lab.dir.join(format!("{cmd}.stderr"));
    let mut child = KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net={}", host.ns.path().display()))
            .arg(bin("lb-agent"))
            .args([cmd, "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn lb-agent"),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "lb-agent {cmd} still runs after {timeout:?}: {}",
            fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Finished {
        status,
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// LB 0's config with `xdp_mode = mode` and `agent_extra` lines in `[agent]`.
fn config(lab: &Lab, mode: &str, agent_extra: &str) -> PathBuf {
    lab.certs();
    let p = lab.agent_config(0, "", "");
    let t = fs::read_to_string(&p).expect("config");
    assert!(t.contains("xdp_mode = \"native\"\n"), "{t}");
    let t = t
        .replace(
            "xdp_mode = \"native\"\n",
            &format!("xdp_mode = \"{mode}\"\n"),
        )
        .replace("[agent]\n", &format!("[agent]\n{agent_extra}"));
    fs::write(&p, t).expect("write config");
    p
}

/// The XDP program id on eth0 of `host`, if one is attached in any mode.
fn xdp_on_eth0(host: &Host) -> Option<String> {
    let out = host.ns.sh("ip -d link show eth0");
    out.split_whitespace()
        .skip_while(|w| !w.starts_with("prog/xdp"))
        .nth(2)
        .map(str::to_string)
}

fn assert_nothing_left(lab: &Lab) {
    assert_eq!(
        xdp_on_eth0(&lab.lbs[0]),
        None,
        "an XDP program is left on eth0"
    );
    assert!(
        !lab.pin_path(0).exists(),
        "pins left under {}",
        lab.pin_path(0).display()
    );
}

#[test]
fn generic_mode_on_a_veth_is_refused_and_auto_takes_native() {
    let Some(lab) = Lab::new("xdpmode_generic", 1, 1) else {
        return;
    };
    let cfg = config(&lab, "generic", "");
    let want = format!(
        "lb-agent: {}: agent.xdp_mode: \"generic\" on eth0 (veth) would corrupt TCP checksums of CHECKSUM_PARTIAL packets; use \"native\" or \"auto\"",
        cfg.display()
    );
    for cmd in ["check-config", "run"] {
        let out = agent_in(&lab, &lab.lbs[0], cmd, &cfg, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines, [want.as_str()], "{cmd}: one line");
        assert_nothing_left(&lab);
    }

    // The lab's own case: auto on a veth is native mode, never generic.
    let cfg = config(&lab, "auto", "");
    let mut agent = lab.start_agent(0, &cfg);
    let s = lab.status(&cfg);
    assert_eq!(s["agent"]["xdp_mode"], "native", "{s}");
    assert!(xdp_on_eth0(&lab.lbs[0]).is_some());
    let st = agent.terminate(Duration::from_secs(10)).expect("stops");
    assert!(st.success(), "{st}\n{}", agent.output());
    assert_nothing_left(&lab);
}

#[test]
fn auto_does_not_fall_back_to_generic_on_a_veth() {
    let Some(lab) = Lab::new("xdpmode_auto", 1, 1) else {
        return;
    };
    // A veth takes native XDP only while its peer's MTU fits a page (veth_xdp_set): with
    // the bridge port at 9000, native mode fails on eth0 the way a driver without XDP would.
    let port = &lab.lbs[0].port;
    let ok = Command::new("ip")
        .args(["link", "set", port, "mtu", "9000"])
        .status()
        .expect("ip link set mtu")
        .success();
    assert!(ok, "ip link set {port} mtu 9000");
    let cfg = config(&lab, "auto", "");
    let out = agent_in(&lab, &lab.lbs[0], "run", &cfg, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    let want = format!(
        "lb-agent: {}: agent.xdp_mode: \"auto\" on eth0 (veth): native mode failed (",
        cfg.display()
    );
    assert!(last.starts_with(&want), "{}", out.stderr);
    assert!(
        last.contains("the peer's MTU is too large") && last.contains("so there is no fallback"),
        "{last}"
    );
    assert!(!out.stderr.contains("falling back"), "{}", out.stderr);
    assert_nothing_left(&lab);
}

/// The pinned VLAN_DEVS map of LB 0, writable.
fn vlan_devs(lab: &Lab) -> PinnedMaps {
    PinnedMaps::open(&lab.pin_path(0)).expect("pinned maps")
}

/// An entry for an ifindex that is no VLAN device (none here: this kernel has no 802.1Q
/// support): what VLAN_DEVS holds after a VLAN device it knew was deleted.
fn plant(lab: &Lab, ifindex: u32) {
    let parent = lab.lbs[0].ns.ifindex("eth0");
    let dev = VlanDev {
        parent,
        vid: 42u16.to_be(),
        _pad: 0,
    };
    vlan_devs(lab)
        .vlan_devs
        .insert(ifindex, dev, 0)
        .expect("VLAN_DEVS insert");
}

fn planted(lab: &Lab, ifindex: u32) -> bool {
    vlan_devs(lab).vlan_devs.get(&ifindex, 0).is_ok()
}

#[test]
fn vlan_devs_follow_link_events_and_the_periodic_reconcile() {
    let Some(lab) = Lab::new("xdpmode_vlan", 1, 1) else {
        return;
    };
    // No periodic pass for an hour: only a link event can refresh VLAN_DEVS.
    let cfg = config(&lab, "native", "reconcile_interval = \"1h\"\n");
    let mut agent = lab.start_agent(0, &cfg);
    // The start's own link events (the XDP attach) are handled within VLAN_SETTLE.
    std::thread::sleep(Duration::from_secs(1));
    plant(&lab, 4000);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        planted(&lab, 4000),
        "removed without a link event:\n{}",
        agent.output()
    );
    // Any link appearing in the agent's namespace makes it read the VLAN devices again.
    lab.lbs[0]
        .ns
        .sh("ip link add xmv0 type veth peer name xmv1");
    wait_for(Duration::from_secs(5), "VLAN_DEVS[4000] removed", || {
        !planted(&lab, 4000)
    });
    let log = "VLAN devices on eth0: VLAN_DEVS[4000]: removed";
    wait_for(Duration::from_secs(2), log, || agent.output().contains(log));
    let st = agent.terminate(Duration::from_secs(10)).expect("stops");
    assert!(st.success(), "{st}\n{}", agent.output());
    assert_nothing_left(&lab);

    // Link events can be lost: the periodic reconcile reads them too.
    let cfg = config(&lab, "native", "reconcile_interval = \"1s\"\n");
    let mut agent = lab.start_agent(0, &cfg);
    std::thread::sleep(Duration::from_secs(1));
    plant(&lab, 4001);
    wait_for(Duration::from_secs(5), "VLAN_DEVS[4001] removed", || {
        !planted(&lab, 4001)
    });
    let log = "VLAN devices on eth0: VLAN_DEVS[4001]: removed";
    wait_for(Duration::from_secs(2), log, || agent.output().contains(log));
    let st = agent.terminate(Duration::from_secs(10)).expect("stops");
    assert!(st.success(), "{st}\n{}", agent.output());
    assert_nothing_left(&lab);
}
