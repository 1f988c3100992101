//! Every translation is parsed back with the config loader `check-config` uses
//! (`Config::parse`: everything but the checks against the host), and the fields asserted
//! on the parsed config.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::{Config, HealthKind};

macro_rules! fixture {
    ($p:literal) => {
        Source::new(
            concat!("testdata/", $p),
            include_str!(concat!("testdata/", $p)),
        )
    };
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// Imports and parses the result; the toml is printed when it does not parse.
fn translate(inputs: &Inputs) -> (Config, Imported) {
    let out = import(inputs).unwrap_or_else(|e| panic!("import failed: {e}"));
    let cfg = Config::parse(Path::new("lb.toml"), &out.toml)
        .unwrap_or_else(|e| panic!("{e}\n--- the import:\n{}", out.toml));
    for n in &out.notes {
        // Each note is a comment in the file too (its first words, before any wrap).
        let line = n.to_string();
        let head: Vec<&str> = line.split_whitespace().take(4).collect();
        assert!(
            out.toml.contains(&head.join(" ")),
            "note not in the file: {n}\n{}",
            out.toml
        );
        assert!(!n.to_string().contains('\n'), "one line: {n}");
    }
    (cfg, out)
}

fn assert_note(out: &Imported, needle: &str) {
    assert!(
        out.notes.iter().any(|n| n.to_string().contains(needle)),
        "no note contains {needle:?}; notes:\n{}",
        out.notes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn names(cfg: &Config, vip: usize) -> Vec<(&str, Ipv4Addr, u16, u32)> {
    cfg.vips[vip]
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.address, b.port, b.weight))
        .collect()
}

#[test]
fn kubeadm_guide_with_haproxy_2_1_on_the_masters() {
    let (cfg, out) = translate(&Inputs {
        haproxy: Some(fixture!("kubeadm/haproxy-2.1.cfg")),
        keepalived: Some(fixture!("kubeadm/keepalived.conf")),
        check_script: Some(fixture!("kubeadm/check_apiserver-2.1.sh")),
        interface: None,
    });
    println!("{}", out.toml);
    assert_eq!(
        cfg.agent.interface.as_deref(),
        Some("eth0"),
        "keepalived's interface"
    );
    assert_eq!(cfg.vips.len(), 1);
    let v = &cfg.vips[0];
    assert_eq!(v.name, "apiserver");
    assert_eq!(
        (v.address, v.port),
        (ip(198, 18, 0, 100), 8443),
        "VIP from keepalived, port from the bind"
    );
    assert_eq!(
        names(&cfg, 0),
        vec![
            ("master01", ip(198, 18, 0, 11), 6443, 100),
            ("master02", ip(198, 18, 0, 12), 6443, 100),
            ("master03", ip(198, 18, 0, 13), 6443, 100),
        ]
    );
    let h = &v.health;
    assert_eq!(
        h.kind,
        HealthKind::Https,
        "ssl-hello-chk becomes an HTTPS probe"
    );
    assert_eq!(h.path, "/readyz");
    assert!(
        h.insecure_skip_verify,
        "HAProxy verified nothing; the CA is to be filled in"
    );
    assert!(
        out.toml
            .contains("# ca_file = \"/etc/kubernetes/pki/ca.crt\""),
        "{}",
        out.toml
    );
    assert_eq!(
        h.interval,
        Duration::from_secs(2),
        "HAProxy's default inter"
    );
    assert_eq!(
        h.timeout,
        Duration::from_secs(2),
        "timeout check 10s, cut to the interval"
    );
    assert_eq!((h.rise, h.fall), (2, 3), "HAProxy's defaults");

    let r = cfg.vrrp.as_ref().expect("[vrrp]");
    assert_eq!(r.name, "VI_1");
    assert_eq!(r.interface, "eth0");
    assert_eq!((r.virtual_router_id, r.priority, r.version), (51, 101, 2));
    assert_eq!(
        r.advert_interval,
        Duration::from_secs(1),
        "keepalived's default"
    );
    assert_eq!(r.auth_pass.as_deref(), Some("42"));
    assert_eq!(r.virtual_addresses, vec![(ip(198, 18, 0, 100), 32)]);
    assert!(r.unicast_peers.is_empty() && r.unicast_src.is_none());
    assert!(r.preempt);
    assert_eq!(r.track.no_healthy_backend, 2, "the script's weight -2");
    assert_eq!(
        (r.track.dataplane_down, r.track.local_backend_down),
        (100, 0)
    );

    assert_note(
        &out,
        "option ssl-hello-chk overrode `option httpchk GET /healthz`",
    );
    assert_note(&out, "haproxy-2.1.cfg:44,47: option ssl-hello-chk");
    assert_note(&out, "balance roundrobin: lb picks a backend by Maglev");
    assert_note(&out, "option http-server-close");
    assert_note(&out, "HTTP-mode settings");
    assert_note(&out, "timeout check: HAProxy gave a check up to 12s");
    assert_note(&out, "vrrp_script check_apiserver (curl https://localhost:8443/; curl https://198.18.0.100:8443/)");
    assert_note(
        &out,
        "its timing (interval 3, fall 10, rise 2) has no equivalent",
    );
    assert_note(&out, "keepalived.conf:4: router_id LVS_DEVEL");
    assert_note(&out, "keepalived.conf:15: state MASTER");
    // HAProxy beside the apiserver: the port advice is a comment, not a change.
    assert!(out.toml.contains("port = 6443 would work"), "{}", out.toml);
}

#[test]
fn kubeadm_guide_current_with_unicast_peers() {
    let (cfg, out) = translate(&Inputs {
        haproxy: Some(fixture!("kubeadm/haproxy.cfg")),
        keepalived: Some(fixture!("kubeadm/keepalived-unicast.conf")),
        check_script: Some(fixture!("kubeadm/check_apiserver.sh")),
        interface: Some("ens3".into()),
    });
    println!("{}", out.toml);
    assert_eq!(
        cfg.agent.interface.as_deref(),
        Some("ens3"),
        "--interface wins"
    );
    let v = &cfg.vips[0];
    assert_eq!((v.address, v.port), (ip(198, 18, 0, 100), 6443));
    assert_eq!(v.backends.len(), 3);
    assert!(v.backends.iter().all(|b| b.port == 6443 && b.weight == 100));
    let h = &v.health;
    assert_eq!(h.kind, HealthKind::Https, "http-check connect ssl");
    assert_eq!(h.path, "/healthz", "the operator's path is kept");
    assert_eq!(h.expect_status, 200);
    assert!(h.insecure_skip_verify, "verify none");
    let r = cfg.vrrp.as_ref().unwrap();
    assert_eq!(r.interface, "ens3", "VRRP runs where XDP attaches");
    assert_eq!((r.priority, r.version), (100, 2));
    assert_eq!(r.unicast_src, Some(ip(198, 18, 0, 3)));
    assert_eq!(r.unicast_peers, vec![ip(198, 18, 0, 2)]);
    assert_eq!(r.auth_pass.as_deref(), Some("42"));
    assert_eq!(r.track.no_healthy_backend, 2);
    assert_note(
        &out,
        "keepalived ran VRRP on eth0; lb runs it on --interface ens3",
    );
    assert_note(
        &out,
        "vrrp_script check_apiserver (curl https://localhost:6443/healthz)",
    );
    assert!(
        !out.notes.iter().any(|n| n.text.contains("ssl-hello-chk")),
        "no ssl-hello-chk in this version"
    );
    // The guide's script against the guide's keepalived without unicast: the same VIP.
    let (cfg, _) = translate(&Inputs {
        haproxy: Some(fixture!("kubeadm/haproxy.cfg")),
        keepalived: Some(fixture!("kubeadm/keepalived.conf")),
        check_script: Some(fixture!("kubeadm/check_apiserver.sh")),
        interface: None,
    });
    assert!(cfg.vrrp.unwrap().unicast_peers.is_empty());
}

#[test]
fn kubespray_listen_block_alone() {
    let (cfg, out) = translate(&Inputs {
        haproxy: Some(fixture!("kubespray/haproxy.cfg")),
        interface: Some("eth1".into()),
        ..Inputs::default()
    });
    println!("{}", out.toml);
    assert!(cfg.vrrp.is_none(), "no keepalived, no [vrrp]");
    assert_eq!(cfg.agent.interface.as_deref(), Some("eth1"));
    let v = &cfg.vips[0];
    assert_eq!(v.name, "kubernetes-apiserver-https");
    assert_eq!(
        (v.address, v.port),
        (ip(198, 18, 0, 100), 8383),
        "the bind's address"
    );
    assert_eq!(
        names(&cfg, 0),
        vec![
            ("master1", ip(198, 18, 0, 11), 6443, 100),
            ("master2", ip(198, 18, 0, 12), 6443, 100)
        ]
    );
    let h = &v.health;
    assert_eq!(
        (h.kind, h.path.as_str()),
        (HealthKind::Https, "/readyz"),
        "check-ssl"
    );
    assert!(h.insecure_skip_verify);
    assert_eq!(h.interval, Duration::from_secs(10), "inter 10000 (ms)");
    assert_eq!(h.timeout, Duration::from_secs(10));
    assert_note(
        &out,
        "check-ssl: HAProxy checked that a TLS handshake succeeds",
    );
    assert_note(
        &out,
        "timeout client 3h, timeout server 3h: lb ends no connection on a timer",
    );
    assert_note(&out, "option log-health-checks");
    // Without an interface nothing says where XDP attaches.
    let e = import(&Inputs {
        haproxy: Some(fixture!("kubespray/haproxy.cfg")),
        ..Inputs::default()
    })
    .unwrap_err();
    assert!(
        matches!(e, ImportError::Usage(_)) && e.to_string().contains("--interface"),
        "{e}"
    );
}

#[test]
fn two_instances_that_agree_make_one_router() {
    let (cfg, out) = translate(&Inputs {
        haproxy: Some(fixture!("two-instances/haproxy.cfg")),
        keepalived: Some(fixture!("two-instances/keepalived.conf")),
        ..Inputs::default()
    });
    println!("{}", out.toml);
    assert_eq!(cfg.vips.len(), 2);
    let (a, b) = (&cfg.vips[0], &cfg.vips[1]);
    assert_eq!(
        (a.name.as_str(), a.address, a.port),
        ("api-a", ip(198, 18, 0, 100), 6443)
    );
    assert_eq!(
        (b.name.as_str(), b.address, b.port),
        ("api-b", ip(198, 18, 0, 101), 6443)
    );
    assert_eq!(
        names(&cfg, 0),
        vec![
            ("a1", ip(198, 18, 0, 11), 6443, 2),
            ("a2", ip(198, 18, 0, 12), 6443, 1),
            ("a3", ip(198, 18, 0, 13), 6443, 0),
        ],
        "weights kept (relative), disabled drained, the backup left out"
    );
    assert!(
        out.toml.contains("  # [[vip.backend]]\n  # name = \"a4\""),
        "{}",
        out.toml
    );
    assert_eq!(
        (a.health.kind, a.health.path.as_str()),
        (HealthKind::Https, "/readyz")
    );
    assert_eq!(a.health.expect_status, 200);
    assert_eq!(
        a.health.interval,
        Duration::from_secs(1),
        "default-server inter 1s"
    );
    assert_eq!((a.health.rise, a.health.fall), (2, 2));
    assert_eq!(b.health.kind, HealthKind::Tcp, "option tcp-check");
    let r = cfg.vrrp.as_ref().unwrap();
    assert_eq!(r.name, "VI_API_A");
    assert_eq!((r.virtual_router_id, r.priority, r.version), (51, 110, 3));
    assert_eq!(
        r.advert_interval,
        Duration::from_millis(100),
        "advert_int 0.1"
    );
    assert!(!r.preempt, "nopreempt");
    assert_eq!(
        r.virtual_addresses,
        vec![(ip(198, 18, 0, 100), 24), (ip(198, 18, 0, 101), 24)]
    );
    assert_eq!(
        (r.garp_count, r.garp_refresh),
        (3, Some(Duration::from_secs(60)))
    );
    assert_eq!(
        r.notify.any,
        Some(vec![
            "/usr/local/bin/vip-notify.sh".to_string(),
            "--log".to_string()
        ])
    );
    assert_eq!(r.track.dataplane_down, 30, "killall -0 haproxy, weight -30");
    assert_eq!(r.track.no_healthy_backend, 50, "lb's own default");
    assert_note(
        &out,
        "vrrp_instance VI_API_B (virtual_router_id 52) is merged into VI_API_A's router",
    );
    assert_note(&out, "label eth0:a: lb adds the address without a label");
    assert_note(&out, "server a4 is a backup");
    assert_note(&out, "enable_script_security, script_user");
    assert_note(&out, "vrrp_script check_haproxy (killall -0 haproxy)");
}

#[test]
fn two_instances_that_disagree_are_refused() {
    let text = include_str!("testdata/two-instances/keepalived.conf").replace(
        "virtual_router_id 52\n    priority 110",
        "virtual_router_id 52\n    priority 100",
    );
    let e = import(&Inputs {
        keepalived: Some(Source::new("k.conf", text)),
        haproxy: Some(fixture!("two-instances/haproxy.cfg")),
        ..Inputs::default()
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("k.conf:37: vrrp_instance VI_API_B: its priority differs"),
        "{e}"
    );
}

#[test]
fn keepalived_alone_gives_the_vrrp_section() {
    let out = import(&Inputs {
        keepalived: Some(fixture!("kubeadm/keepalived.conf")),
        check_script: Some(fixture!("kubeadm/check_apiserver-2.1.sh")),
        ..Inputs::default()
    })
    .unwrap();
    println!("{}", out.toml);
    assert_note(&out, "no --haproxy: the [[vip]] sections");
    assert!(out.toml.contains("# [[vip]]"), "a sketch to fill in");
    // With a [[vip]] written in, it is a config.
    let text = format!(
        "{}\n[[vip]]\nname = \"api\"\naddress = \"198.18.0.100\"\nport = 6443\n[[vip.backend]]\nname = \"m1\"\naddress = \"198.18.0.11\"\n",
        out.toml
    );
    let cfg = Config::parse(Path::new("lb.toml"), &text).unwrap();
    let r = cfg.vrrp.unwrap();
    assert_eq!((r.virtual_router_id, r.priority), (51, 101));
    // Without haproxy ports, the VIP curl still tells what the script checks.
    assert_eq!(r.track.no_healthy_backend, 2);
}

/// A keepalived.conf with one instance: `body` goes in it from line 7 on.
fn ka(body: &str) -> Source {
    Source::new(
        "k.conf",
        format!(
            "vrrp_instance VI_1 {{\n    interface eth0\n    virtual_router_id 51\n    virtual_ipaddress {{\n        198.18.0.100\n    }}\n{body}}}\n"
        ),
    )
}

/// An haproxy.cfg with one frontend and backend: `extra` goes in the backend at line 7.
fn ha(extra: &str) -> Source {
    Source::new(
        "h.cfg",
        format!(
            "frontend api\n    bind 198.18.0.100:6443\n    mode tcp\n    default_backend masters\nbackend masters\n    mode tcp\n{extra}    server m1 198.18.0.11:6443 check\n"
        ),
    )
}

fn with_ka(k: Source) -> Inputs {
    Inputs {
        keepalived: Some(k),
        haproxy: Some(ha("")),
        ..Inputs::default()
    }
}

fn with_ha(h: Source) -> Inputs {
    Inputs {
        haproxy: Some(h),
        interface: Some("eth0".into()),
        ..Inputs::default()
    }
}

#[test]
fn broken_inputs_name_file_and_line() {
    let cases: Vec<(Inputs, &str, &str)> = vec![
        (with_ka(Source::new("k.conf", "include /etc/keepalived/more.conf\n")), "k.conf:1: ", "include"),
        (with_ka(Source::new("k.conf", "vrrp_instance VI_1 {\n interface eth0\n")), "k.conf:1: ", "never closed"),
        (with_ka(Source::new("k.conf", "}\n")), "k.conf:1: ", "closes no block"),
        (with_ka(Source::new("k.conf", "global_defs {\n  router_id \"x\n}\n")), "k.conf:2: ", "quoted string"),
        (with_ka(ka("    advert_int 0.5\n")), "k.conf:7: ", "VRRPv2 counts whole seconds"),
        (with_ka(ka("    advert_int 0.005\n    version 3\n")), "k.conf:7: ", "centiseconds"),
        (with_ka(ka("    authentication {\n        auth_type AH\n        auth_pass x\n    }\n")), "k.conf:8: ", "auth_type AH"),
        (with_ka(ka("    use_vmac\n")), "k.conf:7: ", "use_vmac in vrrp_instance"),
        (with_ka(ka("    track_script {\n        nope\n    }\n")), "k.conf:8: ", "no vrrp_script"),
        (with_ka(ka("    state ${STATE}\n")), "k.conf:7: ", "placeholder"),
        (with_ka(ka("    priority 300\n")), "k.conf:7: ", "1 to 255"),
        (
            with_ka(Source::new("k.conf", "vrrp_instance VI_1 {\n    interface eth0\n    virtual_router_id 51\n    virtual_ipaddress {\n        fd00::1/64\n    }\n}\n")),
            "k.conf:5: ",
            "IPv6",
        ),
        (
            with_ka(Source::new("k.conf", "vrrp_instance VI_1 {\n    interface eth0\n    virtual_router_id 51\n    virtual_ipaddress {\n        198.18.0.100/24 dev eth1\n    }\n}\n")),
            "k.conf:5: ",
            "not on another device",
        ),
        (
            with_ka(Source::new("k.conf", "vrrp_script chk {\n    script \"/etc/keepalived/check_apiserver.sh\"\n}\nvrrp_instance VI_1 {\n    interface eth0\n    virtual_router_id 51\n    virtual_ipaddress {\n        198.18.0.100\n    }\n    track_script {\n        chk\n    }\n}\n")),
            "k.conf:2: ",
            "give it with --check-script FILE",
        ),
        (
            Inputs {
                check_script: Some(Source::new("check.sh", "#!/bin/sh\nnc -z localhost 6443 || exit 1\n")),
                ..with_ka(Source::new("k.conf", "vrrp_script chk {\n    script \"/etc/keepalived/check.sh\"\n}\nvrrp_instance VI_1 {\n    interface eth0\n    virtual_router_id 51\n    virtual_ipaddress {\n        198.18.0.100\n    }\n    track_script {\n        chk\n    }\n}\n"))
            },
            "check.sh:2: ",
            "`nc`",
        ),
        (with_ka(Source::new("k.conf", "virtual_server 198.18.0.100 6443 {\n}\n")), "k.conf:1: ", "LVS"),
        (
            with_ha(Source::new("h.cfg", "defaults\n    mode http\nfrontend api\n    bind 198.18.0.100:6443\n    default_backend b\nbackend b\n    mode tcp\n    server m1 198.18.0.11:6443\n")),
            "h.cfg:2: ",
            "mode http applies to frontend api",
        ),
        (with_ha(ha("    use_backend other if TRUE\n")), "h.cfg:7: ", "one list of backends"),
        (with_ha(ha("    server m2 master2.example:6443 check\n")), "h.cfg:7: ", "host names"),
        (with_ha(ha("    server m2 198.18.0.12:6443 check ssl verify none\n")), "h.cfg:7: ", "encrypted the traffic"),
        (with_ha(ha("    server m2 198.18.0.12:6443 check inter 5s\n")), "h.cfg:8: ", "differ from server m2's"),
        (with_ha(ha("    option mysql-check\n")), "h.cfg:7: ", "not translated"),
        (with_ha(ha("    http-check expect string ok\n")), "h.cfg:7: ", "one status"),
        (with_ha(ha("    server m2 198.18.0.12:6443 check send-proxy\n")), "h.cfg:7: ", "PROXY protocol"),
        (
            with_ha(Source::new("h.cfg", "frontend api\n    bind *:6443\n    default_backend b\nbackend b\n    server m1 198.18.0.11:6443\n")),
            "h.cfg:2: ",
            "give --keepalived FILE too",
        ),
        (
            with_ha(Source::new("h.cfg", "frontend api\n    bind 198.18.0.100:6443 ssl crt /etc/x.pem\n    default_backend b\nbackend b\n    server m1 198.18.0.11:6443\n")),
            "h.cfg:2: ",
            "terminates no TLS",
        ),
        (
            with_ha(Source::new("h.cfg", "frontend api\n    bind 198.18.0.100:6443\n    default_backend nope\n")),
            "h.cfg:3: ",
            "no backend of that name",
        ),
        (
            with_ha(Source::new("h.cfg", "frontend api\n    bind 198.18.0.100:${PORT}\n")),
            "h.cfg:2: ",
            "placeholder",
        ),
        (with_ha(Source::new("h.cfg", "    bind *:6443\n")), "h.cfg:1: ", "outside any section"),
        (
            with_ha(Source::new("h.cfg", "listen api\n    bind 198.18.0.100:6443,198.18.0.101:6443\n    server m1 198.18.0.11:6443\nlisten api-2\n    bind 198.18.0.102:6443\n    server m1 198.18.0.11:6443\n")),
            "h.cfg:4: ",
            "as the one from listen api is",
        ),
        (with_ha(Source::new("h.cfg", "userlist admins\n")), "h.cfg:1: ", "userlist section"),
    ];
    for (inputs, prefix, needle) in cases {
        let e = import(&inputs).expect_err(needle).to_string();
        assert!(
            e.starts_with(prefix) && e.contains(needle),
            "want {prefix}...{needle}, got: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        println!("{e}");
    }
}

#[test]
fn tracking_weights() {
    let script = |weight: &str| {
        Source::new(
            "k.conf",
            format!(
                "vrrp_script chk {{\n    script \"/usr/bin/pgrep haproxy\"\n{weight}}}\nvrrp_instance VI_1 {{\n    interface eth0\n    virtual_router_id 51\n    priority 100\n    virtual_ipaddress {{\n        198.18.0.100\n    }}\n    track_script {{\n        chk\n    }}\n}}\n"
            ),
        )
    };
    let vrrp = |inputs: Inputs| translate(&inputs).0.vrrp.unwrap();
    let r = vrrp(with_ka(script("    weight 20\n")));
    assert_eq!(
        (r.priority, r.track.dataplane_down),
        (120, 20),
        "a positive weight raises the base"
    );
    let (cfg, out) = translate(&with_ka(script("")));
    let r = cfg.vrrp.unwrap();
    assert_eq!(
        (r.priority, r.track.dataplane_down),
        (100, 254),
        "weight 0: FAULT, as near as lb gets"
    );
    assert_note(&out, "keepalived went to FAULT");
    let r = vrrp(with_ka(script("    weight -60\n")));
    assert_eq!(r.track.dataplane_down, 60);
}

#[test]
fn vrrp_details() {
    let (cfg, out) = translate(&with_ka(ka(
        "    version 3\n    advert_int 0.05\n    preempt_delay 30\n    authentication {\n        auth_type PASS\n        auth_pass 42\n    }\n    notify_master \"/etc/keepalived/master.sh up\"\n    notify_stop /etc/keepalived/stop.sh\n    garp_master_delay 1\n",
    )));
    let r = cfg.vrrp.unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(r.advert_interval, Duration::from_millis(50));
    assert_eq!(r.preempt_delay, Duration::from_secs(30));
    assert_eq!(r.auth_pass, None, "VRRPv3 has no authentication");
    assert_eq!(
        r.notify.master,
        Some(vec![
            "/etc/keepalived/master.sh".to_string(),
            "up".to_string()
        ])
    );
    assert_note(&out, "authentication: VRRPv3 has none");
    assert_note(
        &out,
        "notify_stop /etc/keepalived/stop.sh: lb has no separate stop script",
    );
    assert_note(&out, "garp_master_delay: lb sends its gratuitous ARPs");
    // keepalived sent 8 characters of a longer password: lb is given those.
    let (cfg, out) = translate(&with_ka(ka(
        "    authentication {\n        auth_type PASS\n        auth_pass 1234567890\n    }\n",
    )));
    assert_eq!(cfg.vrrp.unwrap().auth_pass.as_deref(), Some("12345678"));
    assert_note(&out, "keepalived sent the first 8");
}

#[test]
fn haproxy_details() {
    // No check at all: no probes, as in HAProxy.
    let h = Source::new(
        "h.cfg",
        "frontend api\n    bind 198.18.0.100:6443\n    default_backend b\nbackend b\n    server m1 198.18.0.11\n    server m2 198.18.0.12 weight 3\n",
    );
    let (cfg, out) = translate(&with_ha(h));
    let v = &cfg.vips[0];
    assert_eq!(v.health.kind, HealthKind::None);
    assert_eq!(
        names(&cfg, 0)[0],
        ("m1", ip(198, 18, 0, 11), 6443, 1),
        "no port: the VIP's"
    );
    assert_eq!(names(&cfg, 0)[1].3, 3);
    assert!(out
        .toml
        .contains("HAProxy used the port the client connected to"));
    // A plain `check`: a TCP connect; a stats listen block is left out.
    let h = Source::new(
        "h.cfg",
        "listen stats\n    bind *:9000\n    mode http\n    stats enable\n    stats uri /\nlisten api\n    bind 198.18.0.100:6443\n    server m1 198.18.0.11:6443 check inter 500ms rise 1 fall 1\n    server m2 198.18.0.12:6443\n",
    );
    let (cfg, out) = translate(&with_ha(h));
    assert_eq!(cfg.vips.len(), 1);
    let hc = &cfg.vips[0].health;
    assert_eq!(hc.kind, HealthKind::Tcp);
    assert_eq!(
        (hc.interval, hc.rise, hc.fall),
        (Duration::from_millis(500), 1, 1)
    );
    assert_note(&out, "h.cfg:1: listen stats: HAProxy's statistics page");
    assert_note(&out, "server m2 has no `check`");
    // httpchk in clear, with the CA named by the server.
    let h = Source::new(
        "h.cfg",
        "frontend api\n    bind 198.18.0.100:6443\n    default_backend b\nbackend b\n    option httpchk GET /livez\n    server m1 198.18.0.11:6443 check check-ssl ca-file /etc/lb/ca.crt check-sni kubernetes\n",
    );
    let (cfg, out) = translate(&with_ha(h));
    let hc = &cfg.vips[0].health;
    assert_eq!((hc.kind, hc.path.as_str()), (HealthKind::Https, "/livez"));
    assert!(!hc.insecure_skip_verify);
    assert_eq!(hc.ca_file, Path::new("/etc/lb/ca.crt"));
    assert_eq!(hc.server_name.as_deref(), Some("kubernetes"));
    assert_note(&out, "no http-check expect: HAProxy took any 2xx or 3xx");
}

#[test]
fn the_command_line_must_give_something() {
    let e = import(&Inputs::default()).unwrap_err();
    assert!(matches!(e, ImportError::Usage(_)), "{e}");
    let e = import(&Inputs {
        haproxy: Some(ha("")),
        check_script: Some(Source::new("c.sh", "killall -0 haproxy")),
        ..Inputs::default()
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("--check-script c.sh: only read with --keepalived"),
        "{e}"
    );
    // A check script no vrrp_script runs.
    let e = import(&Inputs {
        check_script: Some(Source::new("c.sh", "killall -0 haproxy")),
        ..with_ka(ka(""))
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "c.sh: no tracked vrrp_script runs a file of this name"
    );
}

#[test]
fn decimal_seconds() {
    assert_eq!(decimal_seconds_ms("1"), Some(1000));
    assert_eq!(decimal_seconds_ms("0.1"), Some(100));
    assert_eq!(decimal_seconds_ms(".25"), Some(250));
    assert_eq!(decimal_seconds_ms("2.500"), Some(2500));
    assert_eq!(decimal_seconds_ms("0.0001"), None);
    assert_eq!(decimal_seconds_ms("1s"), None);
    assert_eq!(decimal_seconds_ms(""), None);
}
