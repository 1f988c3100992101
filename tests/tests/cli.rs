//! What an operator sees at the edges: config mistakes, missing privileges, no agent.

use std::process::Command;

use lb_tests::{
    lab::{agent_as_nobody, bin},
    netns::require_root,
};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(bin("lb-agent"))
        .args(args)
        .output()
        .expect("run lb-agent")
}

#[test]
fn a_config_mistake_is_one_line_naming_file_and_field_with_status_2() {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("lb.toml");
    std::fs::write(
        &f,
        "[agent]\ninterface = \"lo\"\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n\
         maglev_table_size = 65536\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n",
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let out = agent(&[cmd, "--config", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: exit status 2");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{cmd}: one line: {err}");
        assert!(
            lines[0].contains(&format!(
                "{}: vip[0].maglev_table_size: 65536 is not prime",
                f.display()
            )),
            "{cmd}: {err}"
        );
    }
    let missing = agent(&["check-config", "--config", "/nonexistent/lb.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("/nonexistent/lb.toml: (file): cannot read"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_privileges_the_error_is_clear_and_status_says_no_agent_runs() {
    if !require_root("cli privileges") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lb-cli-priv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("lb.toml");
    std::fs::write(
        &f,
        format!(
            "[agent]\ninterface = \"lo\"\npin_path = \"/sys/fs/bpf/lb-cli-{0}\"\ncontrol_socket = \"{1}/sock\"\n\
             [[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n\
             [vip.health]\nkind = \"none\"\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n",
            std::process::id(),
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // Run as nobody with no capabilities at all.
    let out = agent_as_nobody()
        .args(["run", "--config", f.to_str().unwrap()])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lacks CAP_BPF") && err.contains("CAP_NET_ADMIN"),
        "clear error: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );

    let out = agent(&["status", "--config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "status without an agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lb-agent is not running"), "{err}");
    let out = agent(&["status", "--json", "--config", f.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn priority_255_needs_the_virtual_address_on_the_interface() {
    let dir = std::env::temp_dir().join(format!("lb-cli-owner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("lb.toml");
    let write = |vrrp: &str| {
        std::fs::write(
            &f,
            format!(
                "[agent]\ninterface = \"lo\"\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n\
                 [vip.health]\nkind = \"none\"\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n\
                 [vrrp]\nvirtual_router_id = 51\npriority = 255\n{vrrp}\n"
            ),
        )
        .unwrap();
    };
    // The VIP is not an address of lo: 255 would make this LB a master that does not own it.
    write("");
    let out = agent(&["check-config", "--config", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(": vrrp.priority: 255 is for the owner of the virtual addresses, but 198.18.0.100/32 is not an address of lo"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // 127.0.0.1 is lo's own address: the owner may say 255.
    write("virtual_addresses = [\"127.0.0.1/8\"]");
    let out = agent(&["check-config", "--config", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifest_static_pod_prints_a_pod_running_the_given_image() {
    let out = agent(&["manifest", "static-pod", "--image", "x/y:1"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(yaml.contains("\nkind: Pod\n"), "{yaml}");
    assert!(yaml.contains("image: x/y:1\n"), "{yaml}");
    // A path the kubelet could not mount from the host is refused, not printed.
    let out = agent(&["manifest", "static-pod", "--config", "lb.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be an absolute path"));
}

#[test]
fn import_translates_the_kubeadm_guide_and_check_config_accepts_the_result() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-agent/src/import/testdata/kubeadm");
    let fx = |f: &str| fixtures.join(f).to_str().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("lb-cli-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("lb.toml");
    let (haproxy, keepalived, script) = (
        fx("haproxy-2.1.cfg"),
        fx("keepalived.conf"),
        fx("check_apiserver-2.1.sh"),
    );
    let guide = [
        "import",
        "--haproxy",
        &haproxy,
        "--keepalived",
        &keepalived,
        "--check-script",
        &script,
        "--interface",
        "lo",
    ];
    let o = agent(&[&guide[..], &["--output", out.to_str().unwrap()]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(o.stdout.is_empty(), "the file went to --output");
    assert!(
        err.lines().all(|l| l.starts_with("lb-agent: note: ")),
        "one line per difference: {err}"
    );
    assert!(
        err.contains("haproxy-2.1.cfg:44,47: option ssl-hello-chk overrode"),
        "{err}"
    );
    // The translation is a config this host's check accepts (lo exists everywhere).
    let o = agent(&["check-config", "--config", out.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(&out).unwrap()
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (1 VIPs, 3 backends)"));
    // Without --output, stdout.
    let o = agent(&guide);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("# lb.toml written by `lb-agent import`")
    );

    // What cannot be translated: one line naming the file and line, exit status 2.
    let o = agent(&["import", "--keepalived", &keepalived, "--haproxy", &haproxy]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "lb-agent: {keepalived}:7: vrrp_script check_apiserver runs"
        )),
        "{err}"
    );
    let broken = dir.join("haproxy.cfg");
    std::fs::write(
        &broken,
        "defaults\n    mode http\nfrontend api\n    bind 198.18.0.100:6443\n    default_backend b\nbackend b\n    server m1 198.18.0.11:6443 check\n",
    )
    .unwrap();
    let o = agent(&[
        "import",
        "--haproxy",
        broken.to_str().unwrap(),
        "--interface",
        "lo",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with(&format!(
            "lb-agent: {}:2: mode http applies to frontend api",
            broken.display()
        )),
        "{err}"
    );
    let o = agent(&[
        "import",
        "--haproxy",
        "/nonexistent/haproxy.cfg",
        "--interface",
        "lo",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/haproxy.cfg: cannot read"));
    // Neither input: clap's usage error, also status 2.
    assert_eq!(agent(&["import"]).status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_subcommand_help_has_an_example() {
    for cmd in [
        "run",
        "check-config",
        "reload",
        "restart",
        "version",
        "drain",
        "undrain",
        "backend-setup",
        "import",
        "status",
        "manifest",
        "log-level",
    ] {
        let o = agent(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{cmd}");
        assert!(
            help.contains("\nExample"),
            "{cmd} --help has no example:\n{help}"
        );
        assert!(help.contains(&format!("lb-agent {cmd}")), "{cmd}: {help}");
    }
    let help = String::from_utf8_lossy(&agent(&["--help"]).stdout).to_string();
    assert!(
        help.contains("\nExamples:\n  lb-agent check-config"),
        "{help}"
    );
}
