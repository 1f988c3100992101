//! Socket-mode labs: lb-agent in the client's namespace, with its connect4 and getpeername4
//! hooks on a cgroup the test creates, serving 127.0.0.1:6443 (Kubespray's localhost
//! endpoint) with no interface and no XDP, as on a Kubernetes worker (e2e_socket,
//! e2e_discovery).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    lab::{backend_name, bin, Host, Lab, Proc, VIP, VIP_PORT},
    systemd::setpriv_as_unit,
};

pub use crate::cgroup::Cgroup;

/// A cgroup of the test's, `lb-<lab id>-<name>` under the cgroup v2 root: the lab's
/// footprint check finds it if it outlives the test.
pub fn cgroup(lab: &Lab, name: &str) -> Cgroup {
    Cgroup::create(&format!("lb-{}-{name}", lab.id)).expect("create the test's cgroup")
}

/// The lab's three backends as (name, address, port), as `config` takes them.
pub fn lab_backends(lab: &Lab) -> Vec<(String, Ipv4Addr, u16)> {
    (0..lab.backends.len())
        .map(|i| (backend_name(i), lab.backends[i].addr, VIP_PORT))
        .collect()
}

/// Runs `cmd` with sh in the client's network namespace, inside `cgroup` if given; returns
/// (success, stdout, stderr).
pub fn client_sh(lab: &Lab, cgroup: Option<&Cgroup>, cmd: &str) -> (bool, String, String) {
    sh_in(&lab.client, cgroup, cmd)
}

/// Runs `cmd` with sh in `host`'s network namespace, inside `cgroup` if given.
pub fn sh_in(host: &Host, cgroup: Option<&Cgroup>, cmd: &str) -> (bool, String, String) {
    let enter = match cgroup {
        Some(c) => format!("echo $$ > {}/cgroup.procs && ", c.path().display()),
        None => String::new(),
    };
    // nsenter, not `ip netns exec`: that remounts /sys, and the cgroup tree with it.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", host.ns.path().display()))
        .args(["sh", "-c", &format!("{enter}{cmd}")])
        .output()
        .expect("nsenter");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// lb-loadgen against https://127.0.0.1:6443/version from the client (in `cgroup` if given),
/// `n` new connections.
pub fn loadgen(lab: &Lab, cgroup: Option<&Cgroup>, n: u32) -> serde_json::Value {
    let cmd = format!(
        "exec {} --url https://127.0.0.1:6443/version --ca {} --count {n} --concurrency 4 --timeout 1s",
        bin("lb-loadgen").display(),
        lab.dir.join("pki/ca.crt").display()
    );
    let (_, out, err) = client_sh(lab, cgroup, &cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("loadgen {out:?} {err}: {e}"))
}

/// Writes the config of an agent in the client's namespace: one socket-mode VIP at
/// 127.0.0.1:6443 with `vip_extra` in its table, probes `health`, `backends` (name,
/// address, port), the hooks on `cgroup`, no interface.
pub fn config(
    lab: &Lab,
    cgroup: &Cgroup,
    vip_extra: &str,
    health: &str,
    backends: &[(String, Ipv4Addr, u16)],
) -> PathBuf {
    let c = lab.agent_config_backends(
        0,
        &format!("mode = \"socket\"\n{vip_extra}"),
        health,
        backends,
    );
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replacen(
            &format!("address = \"{VIP}\""),
            "address = \"127.0.0.1\"",
            1,
        )
        .replacen(
            "[agent]\n",
            &format!("[agent]\ncgroup = \"{}\"\n", cgroup.path().display()),
            1,
        )
        // Every VIP in socket mode: no interface, no XDP (as on a Kubespray worker).
        .replacen("interface = \"eth0\"\nxdp_mode = \"native\"\n", "", 1);
    std::fs::write(&c, text).unwrap();
    c
}

/// Starts lb-agent with `config` in the client's namespace (log: agent-client.log, JSON
/// lines) with only the systemd unit's capabilities, as on a worker, and waits up to
/// `timeout` until its status answers and satisfies `ready`.
pub fn start_agent(
    lab: &Lab,
    config: &Path,
    timeout: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Proc {
    let mut argv = setpriv_as_unit();
    argv.extend(
        [
            bin("lb-agent").to_str().unwrap(),
            "--log-format",
            "json",
            "run",
            "--config",
            config.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let agent = lab.spawn_net_only(&lab.client, "agent-client", &argv);
    lab.wait_agent_until(agent, config, timeout, ready)
}
