//! Privileges and the control socket: the agent runs with exactly CAP_BPF, CAP_PERFMON,
//! CAP_NET_ADMIN and CAP_NET_RAW and names the one it lacks; the control socket is 0600 whatever the umask,
//! refuses state changes from peers that are not root, the agent's user or its group, and
//! logs who drained what; `status` works for whoever may read the pins and the socket.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use lb_tests::{
    lab::{agent_as_nobody, bin, Lab},
    vrrp_lab::poll_until,
};

const HEALTH: &str = "interval = \"200ms\"\ntimeout = \"150ms\"";

/// Runs lb-agent as nobody (uid and gid 65534, no capabilities).
fn as_nobody(args: &[&str], config: &Path) -> Output {
    agent_as_nobody()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("setpriv")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// The lab's scratch directory must be reachable by nobody for these tests.
fn open_lab_dir(lab: &Lab) {
    std::fs::set_permissions(&lab.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_control_socket_is_root_only_and_checks_who_changes_state() {
    let Some(lab) = Lab::new("acc_root", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    lab.add_vip(0);
    open_lab_dir(&lab);
    let config = lab.agent_config(0, "", HEALTH);
    let agent = lab.start_agent(0, &config);
    let sock = lab.dir.join("lb1.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0);

    // nobody cannot even connect; the error says why and what to do.
    let out = as_nobody(&["drain", "kube-apiserver", "master01"], &config);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("0600"),
        "{err}"
    );
    let out = as_nobody(&["status"], &config);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot read the pinned maps"), "{err}");

    // A socket made reachable by mistake still refuses state changes from nobody.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["drain", "kube-apiserver", "master01"], &config);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("may read status but not change state"),
        "{err}"
    );
    assert!(
        agent.output().contains("refused Drain"),
        "logged: {}",
        agent.output()
    );
    assert_eq!(
        lab.status(&config)["vips"][0]["backends"][0]["state"],
        "up",
        "nothing changed"
    );

    // Root may, and the log says who.
    let out = Command::new(bin("lb-agent"))
        .args(["drain", "kube-apiserver", "master01", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        agent.output().contains("master01: drained by uid 0 (root)"),
        "{}",
        agent.output()
    );
}

#[test]
fn a_control_group_may_read_status_and_drain() {
    let Some(lab) = Lab::new("acc_group", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    lab.add_vip(0);
    open_lab_dir(&lab);
    let config = lab.agent_config(0, "", HEALTH);
    let t = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[agent]\n", "[agent]\ncontrol_socket_group = \"nogroup\"\n");
    std::fs::write(&config, t).unwrap();
    let agent = lab.start_agent(0, &config);
    let meta = std::fs::metadata(lab.dir.join("lb1.sock")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);

    let out = as_nobody(&["status", "--json"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["agent"]["running"], true, "{s}");
    assert_eq!(s["vips"][0]["name"], "kube-apiserver");

    let out = as_nobody(&["drain", "kube-apiserver", "master02"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        agent
            .output()
            .contains("master02: drained by uid 65534 (nobody)"),
        "{}",
        agent.output()
    );
    assert_eq!(
        lab.status(&config)["vips"][0]["backends"][1]["state"],
        "drain"
    );
}

#[test]
fn the_agent_runs_with_exactly_its_capabilities_and_names_a_missing_one() {
    let Some(lab) = Lab::new("acc_caps", 1, 3) else {
        return;
    };
    let _stubs = lab.start_stubs();
    // A lone VRRP router becomes master: VRRP's raw sockets and addresses work too.
    let config = lab.agent_config_vrrp(
        0,
        HEALTH,
        "virtual_router_id = 51\npriority = 100\nadvert_interval = \"100ms\"\n",
    );
    let exactly = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-all,+bpf,+perfmon,+net_admin,+net_raw",
    ];
    let mut agent = lab.start_agent_with(0, &config, &exactly);
    let master = poll_until(Duration::from_secs(5), || {
        lab.vrrp_state(&config) == "master" && lab.has_vip(0)
    });
    assert!(master.is_some(), "{}", agent.output());
    let report = lab.loadgen("/version", &["--count", "20", "--concurrency", "2"]);
    assert_eq!(report["ok"], 20, "{report}");
    let st = agent.terminate(Duration::from_secs(10)).expect("stops");
    assert!(st.success(), "{}", agent.output());
    assert!(!lab.has_vip(0));

    let without_raw = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-all,+bpf,+perfmon,+net_admin",
    ];
    let mut agent = lab.spawn_agent(0, &config, &without_raw);
    let code = agent.wait(Duration::from_secs(10)).map(|s| s.code());
    let log = agent.output();
    assert_eq!(code, Some(Some(1)), "{log}");
    assert!(
        log.contains("lacks CAP_NET_RAW (VRRP's raw socket and gratuitous ARPs)"),
        "{log}"
    );
    assert!(
        !log.contains("CAP_BPF ("),
        "only the missing one is named: {log}"
    );
    assert!(!lab.pin_path(0).exists(), "it changed nothing");
}
