//! `lb-agent backend-setup` in a fresh network namespace per test (each with its own state
//! file: tests share the VIP and the filesystem), and lb_tc_decap on crafted frames through
//! BPF_PROG_TEST_RUN.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use lb_tests::{
    lab::bin,
    netns::{require_root, unique_id, Netns},
    packet::{Frame, TcpFlags},
};

const VIP: &str = "198.18.0.100";

/// A namespace standing in for an apiserver host, and its state file.
struct Host {
    ns: Netns,
    state: PathBuf,
}

impl Host {
    /// With `veth`, a veth pair inside the namespace, both ends up: the non-loopback
    /// interfaces lb_tc_decap goes on.
    fn new(veth: bool) -> Self {
        let id = unique_id();
        let ns = Netns::new(&format!("lbbs{id}"));
        if veth {
            ns.sh("ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up");
        }
        let state = std::env::temp_dir().join(format!("lb-backend-setup-{id}.json"));
        let _ = std::fs::remove_file(&state);
        Self { ns, state }
    }

    /// Runs `lb-agent backend-setup ARGS --state <this host's file>` in the namespace;
    /// stdout, or a panic with both outputs on failure.
    fn setup(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(bin("lb-agent"))
            .arg("backend-setup")
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .expect("run lb-agent");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "backend-setup {args:?} failed: {}\nstdout: {stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn sysctl(&self, name: &str) -> String {
        self.ns.sh(&format!("sysctl -n {name}")).trim().to_string()
    }

    /// What backend-setup may touch: addresses, links, qdiscs, ingress filters, sysctls.
    fn snapshot(&self) -> String {
        self.ns
            .sh("ip -o addr; ip -o link | cut -d' ' -f2; tc qdisc show; \
             for d in $(ls /sys/class/net); do echo $d; tc filter show dev $d ingress; done; \
             sysctl net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce")
    }

    fn ingress_filters(&self, dev: &str) -> String {
        self.ns.sh(&format!("tc filter show dev {dev} ingress"))
    }

    /// Whether the kernel can make collect_md ipip devices (this machine's cannot).
    fn kernel_has_ipip(&self) -> bool {
        let ok = self
            .ns
            .try_sh("ip link add lbprobe0 type ipip external")
            .is_ok();
        if ok {
            self.ns.sh("ip link del lbprobe0");
        }
        ok
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state);
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn dsr_l2_sets_up_once_and_undo_leaves_the_host_as_it_was() {
    if !require_root("backend-setup dsr-l2") {
        return;
    }
    let h = Host::new(false);
    let before = h.snapshot();
    let out = h.setup(&["--mode", "dsr-l2", "--vip", VIP]);
    assert_eq!(
        lines(&out),
        vec![
            "added 198.18.0.100/32 to lo",
            "net.ipv4.conf.all.arp_ignore: 0 -> 1",
            "net.ipv4.conf.all.arp_announce: 0 -> 2",
        ],
        "{out}"
    );
    assert!(h
        .ns
        .sh("ip -o addr show dev lo")
        .contains("inet 198.18.0.100/32"));
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_ignore"), "1");
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_announce"), "2");
    assert!(h.state.exists(), "the state file records the changes");

    let again = h.setup(&["--mode", "dsr-l2", "--vip", VIP]);
    assert_eq!(
        lines(&again),
        vec!["no change: dsr-l2 for 198.18.0.100 is already set up"]
    );

    let undo = h.setup(&["--mode", "dsr-l2", "--vip", VIP, "--undo"]);
    assert!(
        undo.contains("removed 198.18.0.100/32 from lo")
            && undo.contains("net.ipv4.conf.all.arp_ignore: 1 -> 0 (restored)")
            && undo.contains("net.ipv4.conf.all.arp_announce: 2 -> 0 (restored)"),
        "{undo}"
    );
    assert_eq!(h.snapshot(), before, "undo restores the namespace");
    assert!(
        !h.state.exists(),
        "nothing left to undo: the state file goes"
    );
    let again = h.setup(&["--mode", "dsr-l2", "--vip", VIP, "--undo"]);
    assert!(again.contains("nothing to undo"), "{again}");
}

#[test]
fn arp_sysctls_are_only_raised_and_undo_without_state_keeps_them() {
    if !require_root("backend-setup raise only") {
        return;
    }
    let h = Host::new(false);
    h.ns.sh("sysctl -qw net.ipv4.conf.all.arp_ignore=2");
    let out = h.setup(&["--mode", "dsr-l2", "--vip", VIP]);
    assert!(!out.contains("arp_ignore"), "2 is already >= 1: {out}");
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_ignore"), "2");
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_announce"), "2");

    std::fs::remove_file(&h.state).unwrap();
    let undo = h.setup(&["--mode", "dsr-l2", "--vip", VIP, "--undo"]);
    assert!(
        undo.contains("removed 198.18.0.100/32 from lo")
            && undo.contains("sysctls left as they are"),
        "{undo}"
    );
    assert!(!h.ns.sh("ip -o addr show dev lo").contains(VIP));
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_announce"), "2");
}

#[test]
fn dsr_ipip_decapsulates_where_it_can_and_undo_removes_it_all() {
    if !require_root("backend-setup dsr-ipip") {
        return;
    }
    let h = Host::new(true);
    let before = h.snapshot();
    let native = h.kernel_has_ipip();
    let out = h.setup(&["--mode", "dsr-ipip", "--vip", VIP]);
    if native {
        assert!(out.contains("created lbipip0"), "{out}");
        assert!(h
            .ns
            .sh("ip -o addr show dev lbipip0")
            .contains("inet 198.18.0.100/32"));
        assert!(h.ns.sh("ip -d link show lbipip0").contains("external"));
    } else {
        assert!(out.contains("this kernel has no ipip device type"), "{out}");
        assert!(out.contains("added 198.18.0.100/32 to lo"), "{out}");
        assert!(
            out.contains("attached lb_tc_decap to eth0 ingress")
                && out.contains("attached lb_tc_decap to eth1 ingress"),
            "{out}"
        );
        // The process has exited: the filter holds the program.
        for dev in ["eth0", "eth1"] {
            let f = h.ingress_filters(dev);
            assert!(
                f.contains("lb_tc_decap") && f.contains("direct-action"),
                "{dev}: {f}"
            );
        }
        assert!(h
            .ns
            .sh("ip -o addr show dev lo")
            .contains("inet 198.18.0.100/32"));
    }
    assert_eq!(h.sysctl("net.ipv4.conf.all.arp_ignore"), "1");

    let again = h.setup(&["--mode", "dsr-ipip", "--vip", VIP]);
    assert!(
        again.contains("no change: dsr-ipip for 198.18.0.100 is already set up"),
        "{again}"
    );
    if !native {
        assert_eq!(
            h.ingress_filters("eth0")
                .matches("lb_tc_decap direct-action")
                .count(),
            1,
            "a second run attaches no second filter"
        );
    }

    let undo = h.setup(&["--mode", "dsr-ipip", "--vip", VIP, "--undo"]);
    assert!(undo.contains("removed 198.18.0.100/32"), "{undo}");
    assert_eq!(h.snapshot(), before, "undo restores the namespace");
}

#[test]
fn the_fallback_goes_only_on_the_interfaces_named() {
    if !require_root("backend-setup --interface") {
        return;
    }
    let h = Host::new(true);
    if h.kernel_has_ipip() {
        eprintln!("SKIP: this kernel has ipip devices, the fallback is not used");
        return;
    }
    let out = h.setup(&["--mode", "dsr-ipip", "--vip", VIP, "--interface", "eth1"]);
    assert!(
        out.contains("attached lb_tc_decap to eth1 ingress"),
        "{out}"
    );
    assert!(!out.contains("eth0"), "{out}");
    assert!(!h.ingress_filters("eth0").contains("lb_tc_decap"));
    // Undo without the state file removes what it finds.
    std::fs::remove_file(&h.state).unwrap();
    let undo = h.setup(&["--mode", "dsr-ipip", "--vip", VIP, "--undo"]);
    assert!(
        undo.contains("detached lb_tc_decap from eth1 ingress")
            && undo.contains("removed clsact qdisc from eth1"),
        "{undo}"
    );
    assert!(!h.ns.sh("tc qdisc show").contains("clsact"));
}

#[test]
fn dry_run_changes_nothing_and_prints_the_commands() {
    if !require_root("backend-setup --dry-run") {
        return;
    }
    let h = Host::new(true);
    let before = h.snapshot();
    let l2 = h.setup(&["--mode", "dsr-l2", "--vip", VIP, "--dry-run"]);
    assert_eq!(
        lines(&l2),
        vec![
            "ip addr add 198.18.0.100/32 dev lo",
            "sysctl -w net.ipv4.conf.all.arp_ignore=1",
            "sysctl -w net.ipv4.conf.all.arp_announce=2",
        ]
    );
    let ipip = h.setup(&["--mode", "dsr-ipip", "--vip", VIP, "--dry-run"]);
    if h.kernel_has_ipip() {
        assert!(
            ipip.contains("ip link add lbipip0 type ipip external"),
            "{ipip}"
        );
    } else {
        assert!(
            ipip.contains("tc qdisc add dev eth0 clsact")
                && ipip.contains("tc filter add dev eth0 ingress bpf direct-action"),
            "{ipip}"
        );
    }
    assert_eq!(h.snapshot(), before, "a dry run changes nothing");
    assert!(!h.state.exists(), "nor writes the state file");

    h.setup(&["--mode", "dsr-l2", "--vip", VIP]);
    let set_up = h.snapshot();
    let undo = h.setup(&["--mode", "dsr-l2", "--vip", VIP, "--undo", "--dry-run"]);
    assert_eq!(
        lines(&undo),
        vec![
            "ip addr del 198.18.0.100/32 dev lo",
            "sysctl -w net.ipv4.conf.all.arp_announce=0",
            "sysctl -w net.ipv4.conf.all.arp_ignore=0",
        ]
    );
    assert_eq!(h.snapshot(), set_up, "a dry undo changes nothing");
}

/// `inner` (an Ethernet frame) with an outer IPv4 header, protocol 4, after its MAC header.
fn ipip(inner: &[u8], outer_src: Ipv4Addr, outer_dst: Ipv4Addr) -> Vec<u8> {
    let ip = &inner[14..];
    let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
    outer[2..4].copy_from_slice(&((ip.len() + 20) as u16).to_be_bytes());
    outer.extend(outer_src.octets());
    outer.extend(outer_dst.octets());
    let csum = lb_tests::packet::checksum(&outer, 0);
    outer[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut f = inner[..14].to_vec();
    f.extend(outer);
    f.extend(ip);
    f
}

#[test]
fn lb_tc_decap_strips_the_outer_header_and_passes_the_rest() {
    use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
    if !require_root("lb_tc_decap test run") {
        return;
    }
    let mut ebpf = lb_agent::backend_setup::load_decap().expect("load lb_tc_decap");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(lb_common::PROG_TC_DECAP)
        .expect("in the object")
        .try_into()
        .expect("a classifier");
    let run = |frame: &[u8]| {
        let mut out = vec![0u8; frame.len() + 64];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value as i32, out)
    };
    let mac_a = [0x02, 0, 0, 0, 0, 0x0a];
    let mac_b = [0x02, 0, 0, 0, 0, 0x0b];
    let client = Ipv4Addr::new(198, 18, 0, 50);
    let vip: Ipv4Addr = VIP.parse().unwrap();
    let inner = Frame::tcp(mac_a, mac_b, client, 40000, vip, 6443, TcpFlags::SYN)
        .payload(b"hello")
        .bytes();
    let lb = Ipv4Addr::new(198, 18, 0, 2);
    let backend = Ipv4Addr::new(198, 18, 0, 11);

    let (verdict, out) = run(&ipip(&inner, lb, backend));
    assert_eq!(
        verdict, -1,
        "TC_ACT_UNSPEC: the next filter or the stack decides"
    );
    assert_eq!(out, inner, "the outer header is gone, the rest untouched");

    // Not IPIP, IPIP with options, a fragment: untouched.
    let (verdict, out) = run(&inner);
    assert_eq!((verdict, out), (-1, inner.clone()));
    let mut options = ipip(&inner, lb, backend);
    options[14] = 0x46;
    assert_eq!(run(&options).1, options, "outer IHL 6 is not the LB's");
    let mut fragment = ipip(&inner, lb, backend);
    fragment[14 + 6] = 0x20; // MF
    assert_eq!(run(&fragment).1, fragment);
    let short = &ipip(&inner, lb, backend)[..14 + 20];
    assert_eq!(run(short).1, short, "no inner header: untouched");
}
