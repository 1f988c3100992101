//! End to end, path MTU (issue #10): a client behind routers, with a 1280-byte hop on its
//! path, downloads 1 MiB through the VIP and uploads 1 MiB, each within a time budget (a
//! stall is a failure), and every byte is checked.
//!
//! Four paths:
//! - `&[1280]`: the words, the client's own link has MTU 1280; its SYN's MSS (1240)
//!   tells the backend, so this works even without any ICMP handling.
//! - `&[1500, 1280]`: the 1280 link is one router further out, so the client announces MSS
//!   1460 and only PMTU discovery can save the download: the router's ICMP fragmentation
//!   needed goes to the VIP (the reply's source) and the LB must turn it into an error the
//!   backend's TCP understands.
//! - The LB's own route to the clients has MTU 1280: bpf_fib_lookup answers "fragmentation
//!   needed" for a full-size reply, and the backend must hear of it.
//! - The LB's route to the backends has MTU 1280: the same for the client's upload.
//!
//! Controls that must work whatever the data plane does: a small request through the VIP,
//! and the same 1 MiB download and upload straight from a backend (no LB on the path), which
//! shows the lab's routers do PMTU discovery right. When a transfer is still running after
//! `STALL_S` the test prints, while it hangs, the hosts' ICMP counters, the LB's drop/pass
//! reasons, its route cache towards the client and the backends' TCP sockets (`ss -tni`).

use std::{
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    http::{fnv1a64, pattern},
    lab::{Host, Lab, ROUTED_CLIENT, ROUTED_NET, ROUTER, VIP, VIP_PORT},
};

/// How much each transfer moves.
const SIZE: usize = 1 << 20;
/// Budget for each 1 MiB transfer: a few ms when it works, a stall otherwise.
const BUDGET_S: u32 = 10;
/// A transfer still running after this long is stalled: look at the hosts then.
const STALL_S: u64 = 3;

/// What curl reported for one transfer.
struct Transfer {
    what: String,
    ok: bool,
    exit: Option<i32>,
    http: u16,
    bytes_down: u64,
    bytes_up: u64,
    connect_s: f64,
    tls_s: f64,
    first_byte_s: f64,
    total_s: f64,
    stderr: String,
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (curl exit {:?}, HTTP {}), {} bytes down, {} up, connect {:.3} s, TLS \
             {:.3} s, first byte {:.3} s, total {:.3} s{}",
            self.what,
            if self.ok { "ok" } else { "FAILED" },
            self.exit,
            self.http,
            self.bytes_down,
            self.bytes_up,
            self.connect_s,
            self.tls_s,
            self.first_byte_s,
            self.total_s,
            if self.stderr.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.stderr.trim())
            }
        )
    }
}

/// Runs curl in the client's namespace: GET (or POST `upload`) `url`, body saved to `out`.
fn curl(lab: &Lab, what: &str, url: &str, upload: Option<&Path>, out: &Path) -> Transfer {
    curl_watched(lab, what, url, upload, out, &mut |_| {})
}

/// Like `curl`; `stalled` runs once if the transfer has not ended after `STALL_S` seconds,
/// to look at the hosts while it hangs.
fn curl_watched(
    lab: &Lab,
    what: &str,
    url: &str,
    upload: Option<&Path>,
    out: &Path,
    stalled: &mut dyn FnMut(&Lab),
) -> Transfer {
    let ca = lab.dir.join("pki/ca.crt");
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &lab.client.ns.name,
        "curl",
        "-sS",
        "--cacert",
    ])
    .arg(&ca)
    .args(["--max-time", &BUDGET_S.to_string(), "-o"])
    .arg(out)
    .args([
        "-w",
        "%{http_code} %{size_download} %{size_upload} %{time_connect} \
             %{time_appconnect} %{time_starttransfer} %{time_total}",
    ]);
    if let Some(file) = upload {
        // No Expect: 100-continue (curl waits a second for it on big bodies).
        c.args([
            "-H",
            "Expect:",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()));
    }
    c.arg(url);
    let start = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run curl in the client namespace");
    while child.try_wait().expect("curl").is_none() {
        if start.elapsed() > Duration::from_secs(STALL_S) {
            stalled(lab);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // curl's own --max-time ends it.
    let o = child.wait_with_output().expect("curl");
    let wall = start.elapsed();
    let w = String::from_utf8_lossy(&o.stdout).into_owned();
    let f: Vec<&str> = w.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let t = Transfer {
        what: what.to_string(),
        ok: o.status.success(),
        exit: o.status.code(),
        http: num(0) as u16,
        bytes_down: num(1) as u64,
        bytes_up: num(2) as u64,
        connect_s: num(3),
        tls_s: num(4),
        first_byte_s: num(5),
        total_s: num(6).max(if o.status.success() {
            0.0
        } else {
            wall.as_secs_f64()
        }),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    eprintln!("{t}");
    t
}

/// Checks a download: HTTP 200 and exactly the stub's pattern. Returns what is wrong.
fn check_download(t: &Transfer, out: &Path) -> Result<(), String> {
    if !t.ok || t.http != 200 {
        return Err(format!("{t}"));
    }
    let got = std::fs::read(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let want = pattern(SIZE);
    if got.len() != SIZE {
        return Err(format!("{}: {} bytes, not {SIZE}", t.what, got.len()));
    }
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!("{}: content differs from byte {at} on", t.what));
    }
    Ok(())
}

/// Checks an upload: HTTP 200 and the stub's count and hash of what it received.
fn check_upload(t: &Transfer, out: &Path) -> Result<(), String> {
    if !t.ok || t.http != 200 {
        return Err(format!("{t}"));
    }
    let body = std::fs::read_to_string(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{}: {body:?}: {e}", t.what))?;
    let want_hash = format!("{:016x}", fnv1a64(&pattern(SIZE)));
    if v["received"] != SIZE || v["fnv1a64"] != want_hash.as_str() {
        return Err(format!(
            "{}: the stub got {v}, expected {SIZE} bytes with fnv1a64 {want_hash}",
            t.what
        ));
    }
    Ok(())
}

/// A counter of /proc/net/snmp (e.g. "IcmpMsg", "OutType3") in `h`'s namespace.
fn snmp(h: &Host, group: &str, name: &str) -> u64 {
    let text = h.ns.sh("cat /proc/net/snmp");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{group}:")))
        .collect();
    let [names, values] = rows[..] else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// ICMP destination unreachable messages (type 3, fragmentation needed among them) sent
/// and received by each router, the LB and the backends.
fn icmp_counts(lab: &Lab) -> Vec<(String, u64, u64)> {
    let hosts = lab
        .routers
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("r{}", i + 1), h))
        .chain(lab.lbs.iter().map(|h| ("lb1".to_string(), h)))
        .chain(
            lab.backends
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("be{}", i + 1), h)),
        );
    hosts
        .map(|(n, h)| {
            (
                n,
                snmp(h, "IcmpMsg", "OutType3"),
                snmp(h, "IcmpMsg", "InType3"),
            )
        })
        .collect()
}

fn icmp_delta(before: &[(String, u64, u64)], after: &[(String, u64, u64)]) -> String {
    before
        .iter()
        .zip(after)
        .map(|((n, o0, i0), (_, o1, i1))| format!("{n} sent {} got {}", o1 - o0, i1 - i0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the LB and the backends know when a transfer failed.
fn diagnose(lab: &Lab, config: &Path) -> String {
    let status = lab.status(config);
    let mut out = format!(
        "lb1 counters (drop/pass reasons): {}\nlb1 route to the client: {}",
        status["counters"],
        lab.lbs[0]
            .ns
            .try_sh(&format!("ip route get {ROUTED_CLIENT}"))
            .unwrap_or_default()
            .trim()
    );
    for (i, b) in lab.backends.iter().enumerate() {
        out.push_str(&format!(
            "\nbe{} route to lb1: {}\nbe{} sockets:\n{}",
            i + 1,
            b.ns.try_sh(&format!("ip route get {}", lab.lbs[0].addr))
                .unwrap_or_default()
                .trim(),
            i + 1,
            b.ns.try_sh(&format!("ss -tni '( sport = :{VIP_PORT} )'"))
                .unwrap_or_default()
                .trim()
        ));
    }
    out
}

/// The whole case on a lab whose client sits behind links of `link_mtus`; `setup` runs
/// once the lab is built.
fn transfers_through_the_vip(test: &str, link_mtus: &[u32], setup: impl FnOnce(&Lab)) {
    let Some(lab) = Lab::with_routed_client(test, 1, 2, link_mtus) else {
        return;
    };
    let footprint = lab.footprint();
    setup(&lab);
    {
        let _stubs = lab.start_stubs();
        lab.add_vip(0);
        let config = lab.agent_config(0, "", "kind = \"none\"");
        let _agent = lab.start_agent(0, &config);
        let upload = lab.dir.join("upload.bin");
        std::fs::write(&upload, pattern(SIZE)).expect("write the upload body");
        let vip = format!("https://{VIP}:{VIP_PORT}");
        let out = |name: &str| lab.dir.join(name);

        // Controls: a small request through the VIP; 1 MiB both ways straight from a backend.
        let t = curl(
            &lab,
            &format!("{test}: small via VIP"),
            &format!("{vip}/version"),
            None,
            &out("v"),
        );
        assert!(t.ok && t.http == 200, "control: {t}");
        let version = std::fs::read_to_string(out("v")).unwrap();
        assert!(version.contains("v1.30.0-lb-stub"), "{version}");
        let be = format!("https://{}:{VIP_PORT}", lab.backends[0].addr);
        let t = curl(
            &lab,
            &format!("{test}: 1 MiB download straight from be1"),
            &format!("{be}/bytes?n={SIZE}"),
            None,
            &out("d0"),
        );
        check_download(&t, &out("d0")).unwrap_or_else(|e| panic!("control (no LB): {e}"));
        let t = curl(
            &lab,
            &format!("{test}: 1 MiB upload straight to be1"),
            &format!("{be}/upload"),
            Some(&upload),
            &out("u0"),
        );
        check_upload(&t, &out("u0")).unwrap_or_else(|e| panic!("control (no LB): {e}"));

        // Through the VIP.
        let before = icmp_counts(&lab);
        let mut look = |lab: &Lab| {
            eprintln!(
                "{test}: stalled after {STALL_S} s; ICMP dest-unreachable so far: {}\n{}",
                icmp_delta(&before, &icmp_counts(lab)),
                diagnose(lab, &config)
            )
        };
        let t = curl_watched(
            &lab,
            &format!("{test}: 1 MiB download via VIP"),
            &format!("{vip}/bytes?n={SIZE}"),
            None,
            &out("d1"),
            &mut look,
        );
        let down = check_download(&t, &out("d1"));
        let mid = icmp_counts(&lab);
        eprintln!(
            "{test}: ICMP dest-unreachable during the download: {}",
            icmp_delta(&before, &mid)
        );
        let mut look = |lab: &Lab| {
            eprintln!(
                "{test}: stalled after {STALL_S} s; ICMP dest-unreachable so far: {}\n{}",
                icmp_delta(&mid, &icmp_counts(lab)),
                diagnose(lab, &config)
            )
        };
        let t = curl_watched(
            &lab,
            &format!("{test}: 1 MiB upload via VIP"),
            &format!("{vip}/upload"),
            Some(&upload),
            &out("u1"),
            &mut look,
        );
        let up = check_upload(&t, &out("u1"));
        eprintln!(
            "{test}: ICMP dest-unreachable during the upload: {}",
            icmp_delta(&mid, &icmp_counts(&lab))
        );
        let errs: Vec<String> = [down, up].into_iter().filter_map(Result::err).collect();
        assert!(
            errs.is_empty(),
            "path MTU {link_mtus:?} through the VIP: {}",
            errs.join("; ")
        );
    }
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn pmtu_client_link_1280_moves_1mib_both_ways_through_the_vip() {
    transfers_through_the_vip("e2e_pmtu client link 1280", &[1280], |_| {});
}

#[test]
fn pmtu_bottleneck_one_hop_out_moves_1mib_both_ways_through_the_vip() {
    transfers_through_the_vip("e2e_pmtu bottleneck one hop out", &[1500, 1280], |_| {});
}

/// The LB's own route to the clients has MTU 1280 (as behind a tunnel): its FIB lookup for
/// a full-size reply says "fragmentation needed", and the backend must hear of it.
#[test]
fn pmtu_lb_route_to_clients_mtu_1280_moves_1mib_both_ways_through_the_vip() {
    transfers_through_the_vip("e2e_pmtu LB route to clients 1280", &[1500], |lab| {
        lab.lbs[0].ns.sh(&format!(
            "ip route change {ROUTED_NET} via {ROUTER} dev eth0 mtu lock 1280"
        ));
    });
}

/// The other direction: the LB's route to the backends has MTU 1280, so the client's
/// full-size segments of an upload fail the FIB lookup after the rewrite, and the client
/// must hear of it.
#[test]
fn pmtu_lb_route_to_backends_mtu_1280_moves_1mib_both_ways_through_the_vip() {
    transfers_through_the_vip("e2e_pmtu LB route to backends 1280", &[1500], |lab| {
        let lb = &lab.lbs[0];
        lb.ns.sh(&format!(
            "ip route change 198.18.0.0/24 dev eth0 proto kernel scope link src {} mtu lock 1280",
            lb.addr
        ));
    });
}

/// The lab itself: addresses, routes and MTUs where `with_routed_client` says they are.
#[test]
fn pmtu_routed_lab_has_the_promised_shape() {
    let Some(lab) = Lab::with_routed_client("e2e_pmtu lab shape", 1, 1, &[1500, 1280]) else {
        return;
    };
    let footprint = lab.footprint();
    assert_eq!(lab.client.addr, ROUTED_CLIENT);
    assert_eq!(lab.routers.len(), 2);
    let mtu = |h: &Host, dev: &str| -> u32 {
        h.ns.sh(&format!("cat /sys/class/net/{dev}/mtu"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(mtu(&lab.client, "eth0"), 1500);
    assert_eq!(mtu(&lab.routers[0], "eth1"), 1500);
    assert_eq!(mtu(&lab.routers[0], "eth0"), 1280);
    assert_eq!(mtu(&lab.routers[1], "eth1"), 1280);
    assert_eq!(mtu(&lab.routers[1], "eth0"), 1500);
    let route = lab.client.ns.sh(&format!("ip route get {VIP}"));
    assert!(route.contains("via 198.19.1.1"), "{route}");
    let route = lab.lbs[0].ns.sh(&format!("ip route get {ROUTED_CLIENT}"));
    assert!(route.contains("via 198.18.0.254"), "{route}");
    for r in &lab.routers {
        assert_eq!(r.ns.sh("sysctl -n net.ipv4.ip_forward").trim(), "1");
        let feats = r.ns.sh("ethtool -k eth0");
        assert!(
            feats.contains("generic-receive-offload: off"),
            "GRO off on {}: {feats}",
            r.ns.name
        );
    }
    // A DF datagram too big for the 1280 link, sent from a backend (on the bridge): the
    // router refuses it with ICMP fragmentation needed, and the backend's kernel learns 1280.
    assert_eq!(learned_path_mtu(&lab.backends[0], 1400), 1280);
    drop(lab);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Sends `len`-byte UDP datagrams with DF set from `h` to the routed client until the
/// kernel's path MTU for it drops below the interface's (at most 3 s); returns that MTU.
fn learned_path_mtu(h: &Host, len: usize) -> u32 {
    let _in = h.ns.enter();
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    sock.connect((ROUTED_CLIENT, 9)).expect("connect");
    let fd = sock.as_raw_fd();
    let opt = |name: libc::c_int, set: Option<libc::c_int>| -> libc::c_int {
        let mut v: libc::c_int = set.unwrap_or(0);
        let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let p = &mut v as *mut libc::c_int as *mut libc::c_void;
        // SAFETY: v and l outlive the calls; the sizes match.
        let rc = unsafe {
            if set.is_some() {
                libc::setsockopt(fd, libc::IPPROTO_IP, name, p, l)
            } else {
                libc::getsockopt(fd, libc::IPPROTO_IP, name, p, &mut l)
            }
        };
        assert_eq!(rc, 0, "sockopt {name}: {}", std::io::Error::last_os_error());
        v
    };
    opt(libc::IP_MTU_DISCOVER, Some(libc::IP_PMTUDISC_DO));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // EMSGSIZE once the kernel knows: the datagram no longer fits.
        let _ = sock.send(&vec![0u8; len]);
        std::thread::sleep(Duration::from_millis(50));
        let mtu = opt(libc::IP_MTU, None) as u32;
        if mtu < 1500 || Instant::now() > deadline {
            return mtu;
        }
    }
}
