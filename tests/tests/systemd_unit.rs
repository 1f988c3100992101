//! `packaging/systemd/lb-agent.service`: systemd accepts it, its capabilities are exactly
//! those `lb-agent run` checks for, and its command line is one the agent takes.
//! (PID 1 is not systemd on the test machines: `systemd-analyze verify` checks the unit
//! offline; `e2e_notify` runs the agent with the unit's capabilities and notify socket.)

use std::{io::ErrorKind, path::PathBuf, process::Command};

use lb_agent::host::{missing_caps, Cap, Needs};
use lb_tests::{
    lab::bin,
    netns::unique_id,
    systemd::{unit_path, unit_setting},
};

/// Where the unit expects the binary; the test substitutes the one just built.
const INSTALLED: &str = "/usr/sbin/lb-agent";

/// A scratch directory, removed when dropped (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lb-{name}-{}", unique_id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let dir = TempDir::new("unit-verify");
    let text = std::fs::read_to_string(unit_path()).unwrap();
    assert!(
        text.contains(&format!("ExecStart={INSTALLED} run ")),
        "the unit runs {INSTALLED}"
    );
    // verify checks that every Exec*= binary exists and is executable.
    let agent = bin("lb-agent");
    let unit = dir.0.join("lb-agent.service");
    std::fs::write(&unit, text.replace(INSTALLED, agent.to_str().unwrap())).unwrap();

    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "systemd-analyze not found and CI=true: refusing to skip (Debian: apt-get install systemd; cargo xtask test installs it)"
                );
            }
            eprintln!("SKIP systemd_analyze_verify_accepts_the_unit: systemd-analyze not found (Debian package systemd)");
            return;
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "systemd-analyze verify {}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        unit.display(),
        out.status
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}{stdout}",
        out.status
    );
    // Unknown keys and bad values are warnings with exit status 0: none about this unit.
    // (Lines about other units of the host, pulled in as dependencies, are not ours.)
    let ours: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("lb-agent.service") || l.contains(dir.0.to_str().unwrap()))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}",
        ours.join("\n")
    );
}

/// The capability a `CAP_...` name in the unit means.
fn cap(name: &str) -> Cap {
    match name {
        "CAP_CHOWN" => Cap::Chown,
        "CAP_NET_ADMIN" => Cap::NetAdmin,
        "CAP_NET_RAW" => Cap::NetRaw,
        "CAP_SYS_ADMIN" => Cap::SysAdmin,
        "CAP_SYS_NICE" => Cap::SysNice,
        "CAP_PERFMON" => Cap::Perfmon,
        "CAP_BPF" => Cap::Bpf,
        other => panic!("the unit grants {other}, which lb-agent never checks for"),
    }
}

/// The capabilities of the unit's one `key=` line, sorted.
fn caps_of(key: &str) -> Vec<String> {
    let values = unit_setting(key);
    assert_eq!(values.len(), 1, "one {key}= line: {values:?}");
    let mut names: Vec<String> = values[0].split_whitespace().map(str::to_string).collect();
    names.sort_unstable();
    names
}

#[test]
fn the_unit_grants_exactly_the_capabilities_the_agent_checks_for() {
    let bounding = caps_of("CapabilityBoundingSet");
    assert_eq!(
        caps_of("AmbientCapabilities"),
        bounding,
        "AmbientCapabilities= is the bounding set"
    );
    assert!(
        !bounding.iter().any(|c| c == "CAP_SYS_ADMIN"),
        "no CAP_SYS_ADMIN: systemd mounts bpffs"
    );
    let bits = |names: &[String]| names.iter().fold(0u64, |b, n| b | 1 << cap(n) as u32);
    // Everything configured: VRRP, a DSR VIP, vrrp.rt_priority, agent.control_socket_group.
    let all = Needs {
        vrrp: true,
        dsr: true,
        realtime: true,
        group: true,
    };
    assert_eq!(
        missing_caps(bits(&bounding), all),
        vec![],
        "the unit lets every configuration run"
    );
    // And each one is needed by some configuration.
    for name in &bounding {
        let without: Vec<String> = bounding.iter().filter(|n| n != &name).cloned().collect();
        let missing = missing_caps(bits(&without), all);
        assert!(
            missing.iter().any(|(c, _)| c == name),
            "{name} is granted but lb-agent run never needs it: {missing:?}"
        );
    }
}

#[test]
fn exec_start_is_a_command_line_the_agent_takes() {
    let exec = unit_setting("ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(argv[0], INSTALLED);
    let config = argv
        .iter()
        .position(|a| *a == "--config")
        .map(|i| argv[i + 1])
        .expect("ExecStart= names the config");
    assert_eq!(config, "/etc/lb/lb.toml");
    let reload = unit_setting("ExecReload");
    assert_eq!(
        reload,
        vec![format!("{INSTALLED} reload --config {config}")],
        "reload re-reads the file run was started with"
    );
    // The same arguments with a config that does not exist: the agent parses them and
    // stops at the file (status 2), before it needs any privilege.
    let dir = TempDir::new("unit-cmdline");
    let missing = dir.0.join("lb.toml");
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| {
            if *a == config {
                missing.display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let out = Command::new(bin("lb-agent")).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "lb-agent {args:?}: {err}");
    assert!(
        err.contains(&format!("{}: (file): cannot read", missing.display())),
        "{err}"
    );
}
