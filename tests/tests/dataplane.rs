//! Data plane tests: crafted frames fed to the XDP program through BPF_PROG_TEST_RUN, in a
//! private network namespace whose dummy interface has a route and static neighbours, so
//! the program's FIB lookup succeeds exactly as it would on an LB host.

use lb_common::{reason, state};
use lb_tests::{
    fixture::{
        Fixture, Options, BACKENDS, CLIENT, CLIENT_MAC, LB_ADDR, LB_MAC, VIP, XDP_DROP, XDP_PASS,
        XDP_TX,
    },
    packet::{self, Frame, IcmpError, IcmpKind, Parsed, Quote, TcpFlags},
};

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, sport, VIP, 6443, TcpFlags::SYN)
}

/// Checks the forward rewrite and returns what the backend sees.
fn assert_forwarded(f: &Fixture, verdict: u32, out: &[u8], sport: u16) -> Parsed {
    if verdict != XDP_TX {
        let counts: Vec<String> = (0..reason::COUNT)
            .map(|r| format!("{}={}", reason::NAMES[r as usize], f.reason(r)))
            .collect();
        panic!(
            "verdict {verdict}, not XDP_TX; counters: {}",
            counts.join(" ")
        );
    }
    let p = packet::parse(out).expect("rewritten frame parses");
    assert!(p.ip_csum_ok, "IP checksum valid after rewrite");
    assert!(p.tcp_csum_ok, "TCP checksum valid after rewrite");
    assert_eq!(p.src, LB_ADDR, "source is the SNAT address");
    assert!(
        (61000..=65535).contains(&p.sport),
        "SNAT port {} in range",
        p.sport
    );
    assert_ne!(p.sport, 0);
    let b = f.backend_by_addr(p.dst);
    assert_eq!(p.dport, 6443);
    assert_eq!(p.eth_dst, BACKENDS[b].1, "next hop MAC from the FIB");
    assert_eq!(p.eth_src, LB_MAC);
    let _ = sport;
    p
}

#[test]
fn syn_is_rewritten_to_a_backend_and_the_reply_back_to_the_client() {
    let Some(f) = Fixture::new("dpsyn") else {
        return;
    };
    let (v, out) = f.run(&syn(40000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 40000);

    // The backend's SYN-ACK to SNAT:port becomes VIP:6443 -> client.
    let (bmac, _) = (BACKENDS[f.backend_by_addr(fwd.dst)].1, ());
    let synack = Frame::tcp(
        bmac,
        LB_MAC,
        fwd.dst,
        6443,
        LB_ADDR,
        fwd.sport,
        TcpFlags::SYN | TcpFlags::ACK,
    );
    let (v, out) = f.run(&synack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(
        back.ip_csum_ok && back.tcp_csum_ok,
        "checksums valid on the reply"
    );
    assert_eq!((back.src, back.sport), (VIP, 6443));
    assert_eq!((back.dst, back.dport), (CLIENT, 40000));
    assert_eq!(back.eth_dst, CLIENT_MAC);

    // The client's ACK and data keep the backend and SNAT port (flow table).
    for _ in 0..3 {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 6443, TcpFlags::ACK)
            .payload(b"GET /version HTTP/1.1\r\n\r\n");
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, 40000);
        assert_eq!(
            (p.dst, p.sport),
            (fwd.dst, fwd.sport),
            "same backend, same SNAT port"
        );
    }

    // Until the backend answers past its SYN-ACK the connection is half-open.
    assert_eq!(
        f.writer.maps.half_open.keys().count(),
        2,
        "one entry per direction"
    );
    assert_eq!(f.writer.maps.flows.keys().count(), 0);
    let ack = Frame::tcp(
        bmac,
        LB_MAC,
        fwd.dst,
        6443,
        LB_ADDR,
        fwd.sport,
        TcpFlags::ACK,
    )
    .payload(b"HTTP/1.1 200 OK\r\n\r\n");
    let (v, out) = f.run(&ack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert_eq!((back.dst, back.dport), (CLIENT, 40000));
    assert_eq!(f.reason(reason::ESTABLISHED), 1);
    assert_eq!(f.writer.maps.half_open.keys().count(), 0);
    assert_eq!(
        f.writer.maps.flows.keys().count(),
        2,
        "established: in FLOWS"
    );
    // And established packets keep their backend and port.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 6443, TcpFlags::ACK);
    let (v, out) = f.run(&ack.bytes());
    let p = assert_forwarded(&f, v, &out, 40000);
    assert_eq!((p.dst, p.sport), (fwd.dst, fwd.sport));

    // Counters: one new flow, five packets to the backend, two replies.
    let b = f.backend_by_addr(fwd.dst) as u32;
    let vs = f.writer.maps.stats_vip.get(&0, 0).unwrap();
    let sum = |g: fn(&lb_common::TrafficStats) -> u64| vs.iter().map(g).sum::<u64>();
    assert_eq!(sum(|s| s.new_flows), 1);
    assert_eq!(sum(|s| s.packets), 5);
    assert_eq!(sum(|s| s.reply_packets), 2);
    let bs = f.writer.maps.stats_backend.get(&b, 0).unwrap();
    assert_eq!(bs.iter().map(|s| s.new_flows).sum::<u64>(), 1);
    assert_eq!(bs.iter().map(|s| s.packets).sum::<u64>(), 5);
    assert_eq!(f.reason(reason::TX), 7);
}

#[test]
fn other_traffic_passes_untouched() {
    let Some(f) = Fixture::new("dppass") else {
        return;
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "other port",
            Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40000, VIP, 22, TcpFlags::SYN).bytes(),
            reason::PASS_NOT_OURS,
        ),
        (
            "other address",
            Frame::tcp(
                CLIENT_MAC,
                LB_MAC,
                CLIENT,
                40000,
                LB_ADDR,
                6443,
                TcpFlags::SYN,
            )
            .bytes(),
            reason::PASS_NOT_OURS,
        ),
        (
            "ARP",
            packet::arp_request(CLIENT_MAC, CLIENT, VIP),
            reason::PASS_NOT_IPV4,
        ),
        (
            "IPv6",
            packet::ipv6_frame(CLIENT_MAC, LB_MAC),
            reason::PASS_NOT_IPV4,
        ),
        (
            "ICMP to the VIP",
            packet::icmp_echo(CLIENT_MAC, LB_MAC, CLIENT, VIP),
            reason::PASS_ICMP,
        ),
        (
            "truncated",
            syn(40000).bytes()[..40].to_vec(),
            reason::PASS_TRUNCATED,
        ),
        // BPF_PROG_TEST_RUN takes nothing shorter than an Ethernet header.
        (
            "Ethernet header only",
            syn(40000).bytes()[..14].to_vec(),
            reason::PASS_TRUNCATED,
        ),
    ];
    for (what, frame, r) in cases {
        let before = f.reason(r);
        let (v, out) = f.run(&frame);
        assert_eq!(v, XDP_PASS, "{what}: passed");
        assert_eq!(out, frame, "{what}: untouched");
        assert_eq!(
            f.reason(r),
            before + 1,
            "{what}: counted as {}",
            reason::NAMES[r as usize]
        );
    }
    assert_eq!(f.writer.maps.flows.keys().count(), 0, "no flow created");
}

#[test]
fn rst_without_flow_fragments_and_ip_options() {
    let Some(f) = Fixture::new("dpodd") else {
        return;
    };
    let rst = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 40001, VIP, 6443, TcpFlags::RST);
    let (v, _) = f.run(&rst.bytes());
    assert_eq!(v, XDP_DROP, "RST without a flow is dropped");
    assert_eq!(f.reason(reason::DROP_RST_NO_FLOW), 1);
    assert_eq!(f.writer.maps.flows.keys().count(), 0, "RST creates no flow");

    let frag = syn(40002).more_fragments();
    let (v, _) = f.run(&frag.bytes());
    assert_eq!(v, XDP_DROP, "first fragment for a VIP is dropped");
    assert_eq!(f.reason(reason::DROP_FRAGMENT), 1);

    // Options are kept; both checksums stay right.
    let opt = syn(40003).ip_options(&[1, 1, 1, 0]);
    let (v, out) = f.run(&opt.bytes());
    let p = assert_forwarded(&f, v, &out, 40003);
    assert_eq!(p.ihl, 6);
    assert_eq!(f.reason(reason::IP_OPTIONS), 1);
}

#[test]
fn maglev_spreads_new_flows_and_down_backends_lose_theirs() {
    let Some(mut f) = Fixture::new("dpspread") else {
        return;
    };
    let mut per_backend = [0u32; 3];
    let mut flows = Vec::new();
    for port in 20000..20300u16 {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        per_backend[f.backend_by_addr(p.dst)] += 1;
        flows.push((port, p.dst));
    }
    for (i, n) in per_backend.iter().enumerate() {
        assert!(
            (60..=140).contains(n),
            "backend {i} got {n} of 300 new flows"
        );
    }

    // Drain master01: its flows stay; new flows avoid it.
    let mut vip = f.vips[0].clone();
    f.writer.set_state(&mut vip, 0, state::DRAIN).unwrap();
    for (port, dst) in flows.iter().take(60) {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, *port, VIP, 6443, TcpFlags::ACK);
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, *port);
        assert_eq!(p.dst, *dst, "a drained backend keeps its flows");
    }
    for port in 30000..30100u16 {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        assert_ne!(p.dst, BACKENDS[0].0, "no new flow to a drained backend");
    }

    // master01 down: its clients are reset (they reconnect at once, to a live backend),
    // the others' flows stay.
    f.writer.set_state(&mut vip, 0, state::DOWN).unwrap();
    let before = f.reason(reason::RST_BACKEND_DOWN);
    let mut reset = 0;
    for (port, dst) in &flows {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, *port, VIP, 6443, TcpFlags::ACK);
        let (v, out) = f.run(&ack.bytes());
        if *dst == BACKENDS[0].0 {
            assert_eq!(v, XDP_TX);
            let p = packet::parse(&out).unwrap();
            assert_eq!((p.src, p.sport, p.dst, p.dport), (VIP, 6443, CLIENT, *port));
            assert_eq!(p.flags, TcpFlags::RST, "a down backend's client is reset");
            assert!(p.ip_csum_ok && p.tcp_csum_ok);
            reset += 1;
            // Its next SYN goes to a live backend.
            let (v, out) = f.run(&syn(*port).bytes());
            let p = assert_forwarded(&f, v, &out, *port);
            assert_ne!(p.dst, BACKENDS[0].0);
        } else {
            let p = assert_forwarded(&f, v, &out, *port);
            assert_eq!(p.dst, *dst, "flows of healthy backends never move");
        }
    }
    assert_eq!(f.reason(reason::RST_BACKEND_DOWN) - before, reset);
    f.vips[0] = vip;
}

#[test]
fn frames_for_another_hosts_mac_are_left_to_the_kernel() {
    let Some(mut f) = Fixture::new("dpmac") else {
        return;
    };
    f.writer
        .set_agent_meta(lb_common::AgentMeta {
            mac: LB_MAC,
            ..Default::default()
        })
        .unwrap();
    // A switch flooding a frame meant for the other LB: not ours to balance.
    let other = Frame::tcp(
        CLIENT_MAC,
        [0x02, 0, 0, 0, 0, 0x99],
        CLIENT,
        40000,
        VIP,
        6443,
        TcpFlags::SYN,
    );
    let (v, out) = f.run(&other.bytes());
    assert_eq!(v, XDP_PASS);
    assert_eq!(out, other.bytes(), "untouched");
    assert_eq!(f.reason(reason::PASS_OTHER_HOST), 1);
    assert_eq!(f.writer.maps.flows.keys().count(), 0);
    // Our own MAC still works.
    let (v, _) = f.run(&syn(40000).bytes());
    assert_eq!(v, XDP_TX);
}

/// Milliseconds of CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ms() -> u32 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000) as u32
}

#[test]
fn client_timestamps_reach_the_backend_on_this_hosts_clock_and_come_back_unchanged() {
    let Some(f) = Fixture::new("dpts") else {
        return;
    };
    let client_ts = 3_000_000_000u32;
    let before = monotonic_ms();
    let (v, out) = f.run(&syn(41000).timestamps(client_ts, 0).bytes());
    let after = monotonic_ms();
    let fwd = assert_forwarded(&f, v, &out, 41000);
    let (tsval, tsecr) = fwd.timestamps.expect("timestamp option kept");
    // The program reads the coarse clock, up to a tick behind.
    let before = before.wrapping_sub(20);
    assert!(
        tsval.wrapping_sub(before) <= after.wrapping_sub(before),
        "the backend sees this host's clock ({before}..={after} ms), got {tsval}"
    );
    assert_eq!(tsecr, 0);
    let off = tsval.wrapping_sub(client_ts);

    // SYN-ACK echoing the shifted timestamp: the client gets its own back.
    let bmac = BACKENDS[f.backend_by_addr(fwd.dst)].1;
    let synack = Frame::tcp(
        bmac,
        LB_MAC,
        fwd.dst,
        6443,
        LB_ADDR,
        fwd.sport,
        TcpFlags::SYN | TcpFlags::ACK,
    )
    .timestamps(777, tsval);
    let (v, out) = f.run(&synack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(
        back.tcp_csum_ok && back.ip_csum_ok,
        "checksums after the echo is shifted back"
    );
    assert_eq!(
        back.timestamps,
        Some((777, client_ts)),
        "backend's TSval untouched, TSecr restored"
    );

    // Later segments (NOP, NOP, TS) move by the same offset.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41000, VIP, 6443, TcpFlags::ACK)
        .timestamps(client_ts.wrapping_add(5), 777)
        .payload(b"GET / HTTP/1.1\r\n\r\n");
    let (v, out) = f.run(&ack.bytes());
    let p = assert_forwarded(&f, v, &out, 41000);
    assert_eq!(
        p.timestamps,
        Some((client_ts.wrapping_add(5).wrapping_add(off), 777))
    );

    // A timestamp option at an odd offset (one NOP before it): the checksum still holds.
    let odd = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41000, VIP, 6443, TcpFlags::ACK)
        .tcp_options(&[1, 8, 10, 0xb2, 0xd0, 0x5e, 0x0a, 0, 0, 3, 9]);
    let (v, out) = f.run(&odd.bytes());
    let p = assert_forwarded(&f, v, &out, 41000);
    assert_eq!(
        p.timestamps,
        Some((0xb2d0_5e0a_u32.wrapping_add(off), 0x309))
    );

    // No timestamps on the SYN: none added, none shifted.
    let (v, out) = f.run(&syn(41001).bytes());
    let p = assert_forwarded(&f, v, &out, 41001);
    assert_eq!(p.timestamps, None);
}

/// The backend's SYN-ACK and its first ACK past it for the flow `fwd` (as the backend saw
/// the SYN): both sent on, and the second moves the flow to FLOWS.
fn complete_handshake(f: &Fixture, fwd: &Parsed) {
    let (v, _) = f.run(&from_backend(fwd, TcpFlags::SYN | TcpFlags::ACK).bytes());
    assert_eq!(v, XDP_TX, "the backend's SYN-ACK");
    let (v, _) = f.run(&from_backend(fwd, TcpFlags::ACK).bytes());
    assert_eq!(v, XDP_TX, "the backend's ACK");
}

/// The TCP options of `frame` as the program left them: those sent, with the MSS value at
/// `at` bytes into the options replaced by `mss`.
fn options_with_mss(sent: &Frame, at: usize, mss: u16) -> Vec<u8> {
    let mut o = packet::parse(&sent.bytes()).unwrap().tcp_options;
    o[at..at + 2].copy_from_slice(&mss.to_be_bytes());
    o
}

#[test]
fn mss_clamp_lowers_larger_mss_options_of_syns_and_syn_acks() {
    let Some(f) = Fixture::with(
        "dpmss",
        Options {
            mss_clamp: Some(1360),
            ..Default::default()
        },
    ) else {
        return;
    };
    let clamped = || f.reason(reason::MSS_CLAMPED);

    // Larger than the clamp: lowered, checksums right, every other option byte as it was.
    let sent = syn(50000).mss(1460);
    let (v, out) = f.run(&sent.bytes());
    let fwd = assert_forwarded(&f, v, &out, 50000);
    assert_eq!(fwd.mss, Some(1360));
    assert_eq!(fwd.tcp_options, options_with_mss(&sent, 2, 1360));
    assert_eq!(clamped(), 1);

    // The backend's SYN-ACK is lowered on its way to the client the same way.
    let synack = from_backend(&fwd, TcpFlags::SYN | TcpFlags::ACK).mss(8960);
    let (v, out) = f.run(&synack.bytes());
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(
        back.ip_csum_ok && back.tcp_csum_ok,
        "checksums of the SYN-ACK"
    );
    assert_eq!((back.src, back.dst, back.dport), (VIP, CLIENT, 50000));
    assert_eq!(back.mss, Some(1360));
    assert_eq!(clamped(), 2);

    // The client's SYN again (its first was lost on the way to the backend, which then
    // takes the MSS of this one): lowered too.
    let (v, out) = f.run(&sent.bytes());
    let again = assert_forwarded(&f, v, &out, 50000);
    assert_eq!(
        (again.dst, again.sport, again.mss),
        (fwd.dst, fwd.sport, Some(1360))
    );
    assert_eq!(clamped(), 3);

    // Smaller or equal: untouched, and not counted.
    for (port, mss) in [(50001, 1200), (50002, 1360)] {
        let sent = syn(port).mss(mss);
        let (v, out) = f.run(&sent.bytes());
        let p = assert_forwarded(&f, v, &out, port);
        assert_eq!(
            (p.mss, p.tcp_options.clone()),
            (Some(mss), vec![2, 4, (mss >> 8) as u8, mss as u8])
        );
        let synack = from_backend(&p, TcpFlags::SYN | TcpFlags::ACK).mss(mss);
        let (v, out) = f.run(&synack.bytes());
        assert_eq!(v, XDP_TX);
        let back = packet::parse(&out).unwrap();
        assert!(back.tcp_csum_ok);
        assert_eq!(back.mss, Some(mss));
    }
    assert_eq!(clamped(), 3);

    // No options at all: nothing to lower.
    let (v, out) = f.run(&syn(50003).bytes());
    let p = assert_forwarded(&f, v, &out, 50003);
    assert_eq!((p.mss, p.tcp_options.len()), (None, 0));
    assert_eq!(clamped(), 3);

    // Linux's SYN (MSS, SACK-permitted, timestamps, window scale): the MSS is lowered and
    // the timestamp moved to this host's clock, both in one checksum.
    let sent = syn(50004).timestamps(123_456, 0);
    let (v, out) = f.run(&sent.bytes());
    let p = assert_forwarded(&f, v, &out, 50004);
    assert_eq!(p.mss, Some(1360));
    let (tsval, _) = p.timestamps.expect("timestamps kept");
    let mut want = options_with_mss(&sent, 2, 1360);
    want[8..12].copy_from_slice(&tsval.to_be_bytes());
    assert_eq!(p.tcp_options, want, "only the MSS and the TSval changed");
    assert_eq!(clamped(), 4);

    // Behind one NOP the MSS value sits at an odd offset; behind three and a window scale
    // option, at an even one again. Both ways, SYN and SYN-ACK.
    for (port, opts, at) in [
        (50005, vec![1, 2, 4, 0x05, 0xb4], 3),
        (50006, vec![1, 3, 3, 7, 1, 1, 2, 4, 0x05, 0xb4], 8),
        (50007, vec![1, 1, 1, 2, 4, 0x23, 0x28], 5),
    ] {
        let mss = u16::from_be_bytes([opts[at], opts[at + 1]]);
        let sent = syn(port).tcp_options(&opts);
        let (v, out) = f.run(&sent.bytes());
        let p = assert_forwarded(&f, v, &out, port);
        assert_eq!(p.mss, Some(1360), "{opts:?} ({mss})");
        assert_eq!(p.tcp_options, options_with_mss(&sent, at, 1360));
        let synack = from_backend(&p, TcpFlags::SYN | TcpFlags::ACK).tcp_options(&opts);
        let (v, out) = f.run(&synack.bytes());
        assert_eq!(v, XDP_TX);
        let back = packet::parse(&out).unwrap();
        assert!(
            back.ip_csum_ok && back.tcp_csum_ok,
            "SYN-ACK checksums, {opts:?}"
        );
        assert_eq!(back.tcp_options, options_with_mss(&synack, at, 1360));
    }
    assert_eq!(clamped(), 10);

    // Only handshake segments are looked at: an MSS option on an ACK is left alone.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 50000, VIP, 6443, TcpFlags::ACK).mss(1460);
    let (v, out) = f.run(&ack.bytes());
    let p = assert_forwarded(&f, v, &out, 50000);
    assert_eq!(p.mss, Some(1460));
    let (v, out) = f.run(&from_backend(&fwd, TcpFlags::ACK).mss(1460).bytes());
    assert_eq!(v, XDP_TX);
    assert_eq!(packet::parse(&out).unwrap().mss, Some(1460));
    assert_eq!(clamped(), 10);
}

#[test]
fn a_vip_without_mss_clamp_leaves_mss_alone() {
    let Some(f) = Fixture::new("dpnomss") else {
        return;
    };
    let sent = syn(51000).tcp_options(&[1, 2, 4, 0x23, 0x28]);
    let (v, out) = f.run(&sent.bytes());
    let fwd = assert_forwarded(&f, v, &out, 51000);
    assert_eq!(fwd.mss, Some(9000));
    assert_eq!(fwd.tcp_options, options_with_mss(&sent, 3, 9000));
    let (v, out) = f.run(
        &from_backend(&fwd, TcpFlags::SYN | TcpFlags::ACK)
            .mss(8960)
            .bytes(),
    );
    assert_eq!(v, XDP_TX);
    let back = packet::parse(&out).unwrap();
    assert!(back.tcp_csum_ok);
    assert_eq!((back.dst, back.mss), (CLIENT, Some(8960)));
    assert_eq!(f.reason(reason::MSS_CLAMPED), 0);
}

/// The backend's reply for the flow `fwd` (as the backend saw it), with `flags`.
fn from_backend(fwd: &Parsed, flags: u8) -> Frame {
    let bmac = BACKENDS
        .iter()
        .find(|(a, _)| *a == fwd.dst)
        .expect("a backend")
        .1;
    Frame::tcp(bmac, LB_MAC, fwd.dst, 6443, LB_ADDR, fwd.sport, flags)
}

#[test]
fn packets_without_a_flow_create_no_state() {
    let Some(f) = Fixture::new("dpnoflow") else {
        return;
    };
    // An ACK with data for no connection: a RST back to its sender, SEQ = its ACK.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41000, VIP, 6443, TcpFlags::ACK)
        .payload(&[0x16; 300]);
    let (v, out) = f.run(&ack.bytes());
    assert_eq!(v, XDP_TX, "answered where it came from");
    let r = packet::parse(&out).expect("a TCP frame");
    assert_eq!(out.len(), 54, "headers only: the payload is cut");
    assert_eq!((r.src, r.sport, r.dst, r.dport), (VIP, 6443, CLIENT, 41000));
    assert_eq!((r.eth_src, r.eth_dst), (LB_MAC, CLIENT_MAC));
    assert_eq!(r.flags, TcpFlags::RST);
    assert_eq!(r.seq, 0x0abc_def0, "SEQ is the segment's ACK");
    assert_eq!(r.ip_len, 40);
    assert!(r.ip_csum_ok && r.tcp_csum_ok, "checksums of the RST");
    assert_eq!(f.reason(reason::RST_NO_FLOW), 1);

    // A FIN without ACK: dropped. A RST: dropped.
    let fin = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41001, VIP, 6443, TcpFlags::FIN);
    assert_eq!(f.run(&fin.bytes()).0, XDP_DROP);
    assert_eq!(f.reason(reason::DROP_NO_FLOW), 1);
    let rst = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41002, VIP, 6443, TcpFlags::RST);
    assert_eq!(f.run(&rst.bytes()).0, XDP_DROP);
    assert_eq!(f.reason(reason::DROP_RST_NO_FLOW), 1);
    // A tagged ACK: the RST keeps the tag.
    let tagged = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 41003, VIP, 6443, TcpFlags::ACK).vlan(7);
    let (v, out) = f.run(&tagged.bytes());
    assert_eq!(v, XDP_TX);
    let r = packet::parse(&out).unwrap();
    assert_eq!((r.vlan, r.flags), (Some(7), TcpFlags::RST));
    assert!(r.ip_csum_ok && r.tcp_csum_ok);

    assert_eq!(f.writer.maps.flows.keys().count(), 0, "no flow");
    assert_eq!(
        f.writer.maps.half_open.keys().count(),
        0,
        "no half-open flow"
    );
    assert_eq!(f.vip_stats().new_flows, 0, "no SNAT port taken");
}

#[test]
fn a_syn_flood_recycles_half_open_ports_and_never_touches_established_flows() {
    // Ten ports per backend: a flood of a few hundred SYNs wraps every ring many times.
    let Some(f) = Fixture::with(
        "dpflood",
        Options {
            snat_ports: (61000, 61009),
            ..Options::default()
        },
    ) else {
        return;
    };
    // One established connection per backend (found by trying client ports).
    let mut established: Vec<(u16, Parsed)> = Vec::new();
    for port in 42000..42100u16 {
        if established.len() == 3 {
            break;
        }
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        if established.iter().any(|(_, e)| e.dst == p.dst) {
            // Another connection to a backend that has one: leave it half-open.
            continue;
        }
        complete_handshake(&f, &p);
        established.push((port, p));
    }
    assert_eq!(established.len(), 3);
    assert_eq!(f.reason(reason::ESTABLISHED), 3);

    // 600 spoofed SYNs: 20 times the free ports.
    for i in 0..600u32 {
        let src = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 1)) + i);
        let frame = Frame::tcp(
            CLIENT_MAC,
            LB_MAC,
            src,
            1024 + i as u16,
            VIP,
            6443,
            TcpFlags::SYN,
        );
        let (v, _) = f.run(&frame.bytes());
        assert_eq!(v, XDP_TX, "SYN {i} of the flood got a port");
    }
    assert!(
        f.reason(reason::HALF_OPEN_RECYCLED) >= 500,
        "half-open ports recycled: {}",
        f.reason(reason::HALF_OPEN_RECYCLED)
    );
    assert_eq!(f.reason(reason::DROP_SNAT_EXHAUSTED), 0);
    // A legitimate client still connects, and established flows still go where they went.
    let (v, out) = f.run(&syn(43000).bytes());
    assert_forwarded(&f, v, &out, 43000);
    for (port, e) in &established {
        let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, *port, VIP, 6443, TcpFlags::ACK);
        let (v, out) = f.run(&ack.bytes());
        let p = assert_forwarded(&f, v, &out, *port);
        assert_eq!(
            (p.dst, p.sport),
            (e.dst, e.sport),
            "established flow untouched"
        );
        let (v, out) = f.run(&from_backend(e, TcpFlags::ACK).bytes());
        assert_eq!(v, XDP_TX);
        let back = packet::parse(&out).unwrap();
        assert_eq!((back.dst, back.dport), (CLIENT, *port), "its replies too");
    }
    assert_eq!(f.writer.maps.flows.keys().count(), 6);

    // The flood reached the agent's log as events, a few rather than hundreds: at most one
    // per CPU per second, each saying how many it stands for.
    let recycled = f.reason(reason::HALF_OPEN_RECYCLED);
    let mut ring = lb_agent::dataplane::events::open(f.pin_path()).expect("EVENTS");
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(lb_agent::dataplane::events::decode(&item).expect("an event"));
    }
    let flood: Vec<_> = events
        .iter()
        .filter(|e| e.reason == reason::HALF_OPEN_RECYCLED)
        .collect();
    let cpus = std::thread::available_parallelism().map_or(64, |n| n.get()) as usize;
    assert!(
        !flood.is_empty() && flood.len() <= 2 * cpus,
        "{} events for {recycled} recycled entries: {events:?}",
        flood.len()
    );
    let told: u64 = flood.iter().map(|e| 1 + e.suppressed).sum();
    assert!(told <= recycled, "{told} told, {recycled} counted");
    assert!(
        events
            .iter()
            .all(|e| lb_common::event::emits(e.reason) && e.ktime_ns > 0),
        "{events:?}"
    );
}

#[test]
fn the_timestamp_walk_never_leaves_the_options() {
    let Some(f) = Fixture::new("dptswalk") else {
        return;
    };
    // A flow with timestamps, so its packets get their TSval shifted.
    let (v, out) = f.run(&syn(46000).timestamps(1000, 0).bytes());
    let fwd = assert_forwarded(&f, v, &out, 46000);
    // An option of length 48 ends past the header, at offset 68; masked to 6 bits that is
    // offset 4, the sequence number, which here reads as "timestamp, length 10".
    let seq = 0x080a_0000;
    let bad = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 46000, VIP, 6443, TcpFlags::ACK)
        .seq(seq)
        .tcp_options(&[3, 48, 0, 0]);
    let (v, out) = f.run(&bad.bytes());
    let p = assert_forwarded(&f, v, &out, 46000);
    assert_eq!((p.dst, p.sport), (fwd.dst, fwd.sport));
    assert_eq!(p.seq, seq, "sequence number untouched");
    assert_eq!(p.ack, 0x0abc_def0, "acknowledgement number untouched");
    let sent = bad.bytes();
    assert_eq!(
        out[out.len() - 4..],
        sent[sent.len() - 4..],
        "options untouched"
    );
}

#[test]
fn fragments_are_counted_and_never_translated() {
    let Some(f) = Fixture::new("dpfrag") else {
        return;
    };
    let (v, out) = f.run(&syn(44000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 44000);
    // Later fragments, to the VIP and to the SNAT address: passed, counted as fragments.
    let later_vip = syn(44000).later_fragment();
    let (v, out) = f.run(&later_vip);
    assert_eq!((v, out), (XDP_PASS, later_vip.clone()));
    let later_reply = from_backend(&fwd, TcpFlags::ACK).later_fragment();
    let (v, out) = f.run(&later_reply);
    assert_eq!((v, out), (XDP_PASS, later_reply.clone()));
    assert_eq!(f.reason(reason::PASS_FRAGMENT), 2);
    // First fragments of both directions: dropped, never half-translated.
    let first =
        Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 44000, VIP, 6443, TcpFlags::ACK).more_fragments();
    assert_eq!(f.run(&first.bytes()).0, XDP_DROP);
    let first_reply = from_backend(&fwd, TcpFlags::ACK).more_fragments();
    assert_eq!(f.run(&first_reply.bytes()).0, XDP_DROP);
    assert_eq!(f.reason(reason::DROP_FRAGMENT), 2);
    assert_eq!(f.reason(reason::PASS_NOT_OURS), 0);
}

#[test]
fn close_flags_from_both_sides_reach_both_entries() {
    let Some(f) = Fixture::new("dpflags") else {
        return;
    };
    let (v, out) = f.run(&syn(45000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 45000);
    complete_handshake(&f, &fwd);
    let fin = Frame::tcp(
        CLIENT_MAC,
        LB_MAC,
        CLIENT,
        45000,
        VIP,
        6443,
        TcpFlags::FIN | TcpFlags::ACK,
    );
    // Each side's FIN from two threads at once, many times: every bit lands on both
    // entries (each side also marks its peer's entry).
    std::thread::scope(|s| {
        s.spawn(|| f.run_repeat(f.program(), &fin.bytes(), 2000));
        s.spawn(|| {
            f.run_repeat(
                f.program(),
                &from_backend(&fwd, TcpFlags::FIN | TcpFlags::ACK).bytes(),
                2000,
            )
        });
    });
    let want = lb_common::flow_flags::FIN_CLIENT | lb_common::flow_flags::FIN_BACKEND;
    let mut n = 0;
    for e in f.writer.maps.flows.iter() {
        let (_, v) = e.unwrap();
        assert_eq!(v.flags & want, want, "both FINs on {v:?}");
        n += 1;
    }
    assert_eq!(n, 2);
}

#[test]
fn tagged_frames_leave_on_the_vlan_the_fib_names_or_go_to_the_kernel() {
    let Some(mut f) = Fixture::new("dpvlan") else {
        return;
    };
    // master01 is reached over VLAN 42 on d0; the others untagged on d0. This kernel has no
    // 802.1Q devices (CONFIG_VLAN_8021Q is off), so another interface stands in for d0.42:
    // the program only knows a VLAN device as an egress ifindex that VLAN_DEVS describes.
    let (b0, b0mac) = BACKENDS[0];
    f.ns.sh(&format!(
        "ip link add v42 type veth peer name v42p && ip link set v42 up && ip link set v42p up && \
         ip addr add 198.18.42.2/24 dev v42 && ip route replace {b0}/32 dev v42 && \
         ip neigh replace {b0} lladdr {} dev v42 nud permanent",
        packet::mac_str(&b0mac)
    ));
    let vlan_if = f.ns.ifindex("v42");
    let dev = lb_common::VlanDev {
        parent: f.ifindex,
        vid: 42u16.to_be(),
        _pad: 0,
    };
    f.writer.set_vlans(&[(vlan_if, dev)]).unwrap();
    let mut seen = [0u32; 4];
    for port in 47000..47060u16 {
        // Tagged with VLAN 7: to VLAN 42 by XDP with the tag rewritten; to the untagged
        // backends through the kernel.
        let (v, out) = f.run(&syn(port).vlan(7).bytes());
        let p = packet::parse(&out).unwrap();
        assert!(p.ip_csum_ok && p.tcp_csum_ok);
        if p.dst == b0 {
            assert_eq!(
                (v, p.vlan, p.eth_dst),
                (XDP_TX, Some(42), b0mac),
                "port {port}"
            );
            seen[0] += 1;
        } else {
            assert_eq!(
                v, XDP_PASS,
                "tagged frame, untagged egress: the kernel forwards it"
            );
            assert_eq!(
                p.vlan,
                Some(7),
                "the kernel gets the frame as it came, rewritten"
            );
            seen[1] += 1;
        }
        // Untagged (a NIC that strips tags looks the same): VLAN 42 goes to the kernel.
        let (v, out) = f.run(&syn(port + 1000).bytes());
        let p = packet::parse(&out).unwrap();
        if p.dst == b0 {
            assert_eq!((v, p.vlan), (XDP_PASS, None));
            seen[2] += 1;
        } else {
            assert_eq!((v, p.vlan), (XDP_TX, None));
            seen[3] += 1;
        }
    }
    assert!(seen.iter().all(|n| *n > 0), "every case met: {seen:?}");
    assert_eq!(f.reason(reason::TX_VLAN) as u32, seen[0]);
    assert_eq!(f.reason(reason::PASS_FIB_OTHER) as u32, seen[1] + seen[2]);
    // The agent's view: VLAN_DEVS holds what it was given, and only that.
    assert_eq!(f.writer.set_vlans(&[]).unwrap().len(), 1);
    assert_eq!(f.writer.maps.vlan_devs.keys().count(), 0);
}

/// xorshift64*: a seeded generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Up to 40 bytes of TCP options: random bytes, or a list of real options (MSS among
    /// them, of any value) with now and then a broken one.
    fn tcp_options(&mut self) -> Vec<u8> {
        if self.below(2) == 0 {
            let n = 4 * self.below(11) as usize;
            return self.bytes(n);
        }
        let mut o = Vec::new();
        loop {
            let next: Vec<u8> = match self.below(8) {
                0 | 1 => packet::mss_option(self.next() as u16).to_vec(),
                2 => vec![1],
                3 => vec![4, 2],
                4 => vec![3, 3, self.below(15) as u8],
                5 => {
                    let mut ts = vec![8, 10];
                    ts.extend(self.bytes(8));
                    ts
                }
                6 => vec![self.next() as u8, self.below(6) as u8],
                _ => vec![0],
            };
            if o.len() + next.len() > 40 || self.below(6) == 0 {
                return o;
            }
            o.extend(next);
        }
    }
}

#[test]
fn fuzzed_frames_are_passed_untouched_or_sent_with_valid_checksums() {
    const CLAMP: u16 = 1360;
    let Some(f) = Fixture::with(
        "dpfuzz",
        Options {
            mss_clamp: Some(CLAMP),
            ..Default::default()
        },
    ) else {
        return;
    };
    let seed = 0x5eed_1b0b_u64;
    let mut rng = Rng(seed);
    let mut verdicts = [0u32; 4];
    // (backend, SNAT port) of connections the program opened, so replies reach their flows.
    let mut opened: Vec<(std::net::Ipv4Addr, u16)> = Vec::new();
    // MSS options lowered: towards backends, towards clients.
    let mut clamped = [0u64; 2];
    for i in 0..3000 {
        let mut src = match rng.below(3) {
            0 => CLIENT,
            1 => BACKENDS[rng.below(3) as usize].0,
            _ => std::net::Ipv4Addr::from(0xc613_0000 | rng.below(1 << 16) as u32),
        };
        let mut dst = match rng.below(4) {
            0 | 1 => VIP,
            2 => LB_ADDR,
            _ => std::net::Ipv4Addr::from(0xc612_0000 | rng.below(1 << 16) as u32),
        };
        let (mut sport, mut dport) = match rng.below(3) {
            0 => (20000 + rng.below(50) as u16, 6443),
            1 => (6443, 61000 + rng.below(50) as u16),
            _ => (rng.next() as u16, rng.next() as u16),
        };
        if !opened.is_empty() && rng.below(4) == 0 {
            let (b, port) = opened[rng.below(opened.len() as u64) as usize];
            (src, sport, dst, dport) = (b, 6443, LB_ADDR, port);
        }
        let (flags, seq) = (rng.next() as u8, rng.next() as u32);
        let options = rng.tcp_options();
        let payload_len = rng.below(200) as usize;
        let payload = rng.bytes(payload_len);
        let mut frame = Frame::tcp(CLIENT_MAC, LB_MAC, src, sport, dst, dport, flags)
            .seq(seq)
            .tcp_options(&options)
            .payload(&payload);
        if rng.below(8) == 0 {
            frame = frame.vlan(rng.below(4095) as u16 + 1);
        }
        if rng.below(8) == 0 {
            frame = frame.ip_options(&[1, 1, 1, 0]);
        }
        let mut bytes = if rng.below(10) == 0 {
            frame.later_fragment()
        } else {
            frame.bytes()
        };
        if rng.below(10) == 0 {
            let keep = 14 + rng.below(50) as usize;
            bytes.truncate(keep);
        }
        let (v, out) = f.run(&bytes);
        verdicts[v as usize] += 1;
        let ours = (dst == VIP && dport == 6443) || dst == LB_ADDR;
        let why = format!("case {i} (seed {seed:#x}): verdict {v}, frame {bytes:02x?}");
        match v {
            XDP_PASS if !ours => assert_eq!(out, bytes, "not lb's: untouched; {why}"),
            XDP_PASS | XDP_TX if out != bytes => {
                let p = packet::parse(&out).unwrap_or_else(|| panic!("unparsable; {why}"));
                assert!(p.ip_csum_ok && p.tcp_csum_ok, "checksums; {why}");
                assert!(ours, "rewrote a packet that is not lb's; {why}");
                let sent = packet::parse(&bytes).unwrap_or_else(|| panic!("{why}"));
                // Every SYN lb sends on (RSTs it makes carry no SYN) announces at most the
                // clamp, and only its MSS changed from what came in.
                if p.flags & TcpFlags::SYN != 0 {
                    let want = sent.mss.map(|m| m.min(CLAMP));
                    assert_eq!(p.mss, want, "MSS; {why}");
                    if sent.mss != want {
                        clamped[(p.src != LB_ADDR) as usize] += 1;
                    }
                }
                if p.src == LB_ADDR && !opened.contains(&(p.dst, p.sport)) {
                    opened.push((p.dst, p.sport));
                }
            }
            XDP_PASS | XDP_DROP => {}
            _ => panic!("{why}"),
        }
    }
    assert!(
        verdicts[XDP_TX as usize] > 100 && verdicts[XDP_PASS as usize] > 100,
        "the fuzzer reached both paths: {verdicts:?}"
    );
    // Every backend is up and ports are plenty: no SYN is dropped after its MSS was lowered.
    assert_eq!(
        f.reason(reason::MSS_CLAMPED),
        clamped[0] + clamped[1],
        "every clamp counted once"
    );
    assert!(
        clamped.iter().all(|&n| n > 5),
        "the fuzzer lowered MSS options both ways: {clamped:?}"
    );
}

/// A router on the fixture's link that reports errors.
const ROUTER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 254);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

#[test]
fn icmp_errors_about_a_flow_are_translated_both_ways() {
    let Some(f) = Fixture::new("dpicmp") else {
        return;
    };
    let (v, out) = f.run(&syn(48000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 48000);
    let sent_to_backend = out.clone();
    let (v, _) = f.run(&from_backend(&fwd, TcpFlags::SYN | TcpFlags::ACK).bytes());
    assert_eq!(v, XDP_TX);
    // A full-sized segment of the response, established by now.
    let (v, out) = f.run(
        &from_backend(&fwd, TcpFlags::ACK)
            .timestamps(5, 6)
            .payload(&[0x17; 1436])
            .bytes(),
    );
    assert_eq!(v, XDP_TX);
    let sent_to_client = out;

    // A router on the client's path cannot take the reply: the backend must hear of it.
    // Linux quotes as much as fits in 576 bytes.
    let err = IcmpError::about_ip(
        ROUTER_MAC,
        LB_MAC,
        ROUTER,
        VIP,
        IcmpKind::FragNeeded { mtu: 1280 },
        &sent_to_client[14..],
    )
    .quote(Quote::Linux);
    let (v, out) = f.run(&err.bytes());
    assert_eq!(v, XDP_TX);
    let p = packet::parse_icmp(&out).expect("an ICMP error");
    assert_eq!(
        (p.src, p.dst),
        (LB_ADDR, fwd.dst),
        "from the SNAT address to the backend"
    );
    assert_eq!(p.eth_dst, BACKENDS[f.backend_by_addr(fwd.dst)].1);
    assert_eq!((p.icmp_type, p.code, p.mtu), (3, 4, Some(1280)));
    assert_eq!(
        (p.inner.src, p.inner.sport, p.inner.dst, p.inner.dport),
        (fwd.dst, 6443, LB_ADDR, fwd.sport),
        "quotes the packet as the backend sent it"
    );
    assert!(p.ip_csum_ok && p.icmp_csum_ok && p.inner.ip_csum_ok);
    assert_eq!(
        p.inner.tcp_csum_ok, None,
        "a partial segment: no checksum to check"
    );
    assert!(
        p.inner.tcp_check.is_some(),
        "the quoted TCP checksum is there (and updated)"
    );

    // A router on the backend's path drops a client packet: the client hears of it.
    let err = IcmpError::about_ip(
        ROUTER_MAC,
        LB_MAC,
        ROUTER,
        LB_ADDR,
        IcmpKind::TimeExceeded,
        &sent_to_backend[14..],
    );
    let (v, out) = f.run(&err.bytes());
    assert_eq!(v, XDP_TX);
    let p = packet::parse_icmp(&out).expect("an ICMP error");
    assert_eq!((p.src, p.dst, p.eth_dst), (VIP, CLIENT, CLIENT_MAC));
    assert_eq!((p.icmp_type, p.code), (11, 0));
    assert_eq!(
        (p.inner.src, p.inner.sport, p.inner.dst, p.inner.dport),
        (CLIENT, 48000, VIP, 6443),
        "quotes the packet as the client sent it"
    );
    assert!(p.ip_csum_ok && p.icmp_csum_ok && p.inner.ip_csum_ok);
    assert_eq!(p.inner.tcp_csum_ok, Some(true));
    // Linux quotes up to 576 bytes; the minimum (8 bytes of TCP) works too.
    let err = IcmpError::about_ip(
        ROUTER_MAC,
        LB_MAC,
        ROUTER,
        LB_ADDR,
        IcmpKind::HostUnreachable,
        &sent_to_backend[14..],
    )
    .quote(Quote::Min8);
    let (v, out) = f.run(&err.bytes());
    assert_eq!(v, XDP_TX);
    let p = packet::parse_icmp(&out).unwrap();
    assert!(p.ip_csum_ok && p.icmp_csum_ok && p.inner.ip_csum_ok);
    assert_eq!((p.dst, p.inner.sport), (CLIENT, 48000));
    assert_eq!(f.reason(reason::ICMP_TRANSLATED), 3);

    // About no flow, or not an error: passed untouched.
    let stray = IcmpError::new(
        ROUTER_MAC,
        LB_MAC,
        ROUTER,
        VIP,
        IcmpKind::HostUnreachable,
        &Frame::tcp(LB_MAC, CLIENT_MAC, VIP, 6443, CLIENT, 9, TcpFlags::ACK),
    )
    .bytes();
    let echo = packet::icmp_echo(CLIENT_MAC, LB_MAC, CLIENT, VIP);
    for frame in [stray, echo] {
        let (v, out) = f.run(&frame);
        assert_eq!((v, &out), (XDP_PASS, &frame));
    }
    assert_eq!(f.reason(reason::PASS_ICMP), 2);
}

#[test]
fn a_packet_too_big_for_the_route_gets_fragmentation_needed() {
    let Some(f) = Fixture::new("dpmtu") else {
        return;
    };
    for (b, _) in BACKENDS {
        f.ns.sh(&format!("ip route replace {b}/32 dev d0 mtu lock 1280"));
    }
    let (v, out) = f.run(&syn(49000).bytes());
    let fwd = assert_forwarded(&f, v, &out, 49000);
    f.run(&from_backend(&fwd, TcpFlags::SYN | TcpFlags::ACK).bytes());
    // 1240 bytes fit; 1400 do not.
    let small =
        Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 49000, VIP, 6443, TcpFlags::ACK).payload(&[7; 1200]);
    let (v, out) = f.run(&small.bytes());
    assert_forwarded(&f, v, &out, 49000);
    let big =
        Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 49000, VIP, 6443, TcpFlags::ACK).payload(&[7; 1360]);
    let (v, out) = f.run(&big.bytes());
    assert_eq!(v, XDP_TX, "answered, not forwarded");
    let p = packet::parse_icmp(&out).expect("an ICMP error");
    assert_eq!((p.src, p.dst, p.eth_dst), (VIP, CLIENT, CLIENT_MAC));
    assert_eq!((p.icmp_type, p.code, p.mtu), (3, 4, Some(1280)));
    assert_eq!(
        (
            p.inner.src,
            p.inner.sport,
            p.inner.dst,
            p.inner.dport,
            p.inner.tot_len
        ),
        (CLIENT, 49000, VIP, 6443, 1400),
        "quotes the client's packet as it sent it"
    );
    assert!(p.ip_csum_ok && p.icmp_csum_ok && p.inner.ip_csum_ok);
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "IP header and 8 bytes quoted");
    assert_eq!(f.reason(reason::ICMP_FRAG_NEEDED_SENT), 1);
}

#[test]
fn a_backends_new_mac_reaches_new_and_existing_flows_within_a_second() {
    let Some(f) = Fixture::new("dpnewmac") else {
        return;
    };
    let (v, out) = f.run(&syn(48000).bytes());
    let first = assert_forwarded(&f, v, &out, 48000);
    // The backend's host was replaced: same address, new MAC.
    let new_mac = [0x02, 0x00, 0x5e, 0x00, 0x4e, 0x77];
    f.ns.sh(&format!(
        "ip neigh replace {} lladdr {} dev d0 nud permanent",
        first.dst,
        packet::mac_str(&new_mac)
    ));
    // Next hops are cached for a second, per flow and per backend.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // A new flow to that backend asks the FIB and refreshes the backend's shared next hop...
    let mut found = false;
    for port in 48001..48200u16 {
        let (v, out) = f.run(&syn(port).bytes());
        assert_eq!(v, XDP_TX, "SYN from port {port}");
        let p = packet::parse(&out).unwrap();
        if p.dst == first.dst {
            assert_eq!(p.eth_dst, new_mac, "new flow from port {port}");
            found = true;
            break;
        }
    }
    assert!(found, "no SYN of 199 went to {}", first.dst);
    // ...which the existing flow's next packet copies.
    let ack = Frame::tcp(CLIENT_MAC, LB_MAC, CLIENT, 48000, VIP, 6443, TcpFlags::ACK);
    let (v, out) = f.run(&ack.bytes());
    assert_eq!(v, XDP_TX);
    let p = packet::parse(&out).unwrap();
    assert_eq!((p.dst, p.sport), (first.dst, first.sport), "same flow");
    assert_eq!(p.eth_dst, new_mac, "existing flow after the refresh");
    assert!(p.ip_csum_ok && p.tcp_csum_ok);
}

#[test]
fn a_block_of_established_ports_longer_than_the_tries_does_not_stop_new_flows() {
    // Connections opened back to back (kubelets reconnecting after a restart) hold
    // consecutive ports of each backend's ring; when the ring comes round to them, a SYN
    // must get past the whole block, not give up after SNAT_TRIES ports of it.
    let Some(f) = Fixture::with(
        "dpblock",
        Options {
            snat_ports: (61000, 61099),
            ..Options::default()
        },
    ) else {
        return;
    };
    let n = f.vips[0].backends.len();
    let cursors = f.snat_cursors();
    let start: Vec<(u32, u64)> = f.vips[0]
        .backends
        .iter()
        .map(|b| (b.index, cursors.get(&b.index, 0).unwrap()))
        .collect();
    // 20 established connections per backend at least: 60 in a row.
    let mut per_backend = vec![0usize; n];
    let mut port = 50000u16;
    while per_backend.iter().any(|&c| c < 20) {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        complete_handshake(&f, &p);
        per_backend[f.backend_by_addr(p.dst)] += 1;
        port += 1;
    }
    // The rings come round to the start of the blocks.
    let mut cursors = f.snat_cursors();
    for (index, at) in &start {
        cursors.set(*index, *at, 0).unwrap();
    }
    for port in 51000..51030u16 {
        let (v, out) = f.run(&syn(port).bytes());
        let p = assert_forwarded(&f, v, &out, port);
        assert!(
            p.sport >= 61000 && p.sport <= 61099,
            "SNAT port {} in range",
            p.sport
        );
    }
    assert_eq!(f.reason(reason::DROP_SNAT_EXHAUSTED), 0);
}
