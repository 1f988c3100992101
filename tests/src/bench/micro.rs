//! The microbenchmark: the XDP program run through BPF_PROG_TEST_RUN with `repeat`, in the
//! data plane fixture, for each kind of packet, against a trivial XDP_PASS program.
//!
//! BPF_PROG_TEST_RUN runs the program `repeat` times on one buffer and keeps what each run
//! wrote: after the first run a forwarded packet has become SNAT -> backend, which the next
//! run passes as "not ours". So the fixture is arranged for every run to take the same path:
//! the backends sit at the VIP's own address (each with its own name, so Maglev, BACKENDS
//! and the counters are as with distinct hosts) and the SNAT address is the client's.
//! - established: the client's port is the SNAT port its flow got, so the rewrite
//!   C:p -> VIP:6443 => C:p -> backend(=VIP):6443 gives back the same packet, and every run
//!   is a flow table hit, rewrite, FIB lookup and XDP_TX;
//! - reply: the backend's reply of that flow is likewise its own translation;
//! - SYN: each run's rewrite is a SYN from a port not seen before, so each run creates a
//!   flow (Maglev, SNAT port, two HALF_OPEN inserts). The SNAT port rings are
//!   spread over the range so that no two backends hand out the same port, and the flows
//!   are deleted between batches so the ring never comes round to a taken port.
//!
//! The counters check each case: every run of a batch must have done what the case names.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{ensure, Context, Result};
use aya::{maps::MapData, programs::Xdp, Ebpf};
use lb_common::{map, reason, FlowKey, IPPROTO_TCP, MAX_FLOWS, PROG_PASS};
use serde::Serialize;

use super::{
    parse::{self, MapInfo},
    stats,
};
use crate::{
    fixture::{
        BackendSpec, Fixture, Options, CLIENT, CLIENT_MAC, LB_ADDR, LB_MAC, VIP, VIP_MAC, VIP_PORT,
        XDP_PASS, XDP_TX,
    },
    packet::{self, Frame, TcpFlags},
};

/// The SNAT range of the fixture: as wide as it goes, so a SYN batch can be large.
const SNAT_PORTS: (u16, u16) = (1024, 65535);
/// The client port of the established flow: the first port of the ring, which the flow's
/// SNAT port will be.
const EST_PORT: u16 = SNAT_PORTS.0;
/// The first SYN's client port: below the SNAT range, so no later SYN of the batch uses it.
const SYN_PORT: u16 = 1000;
/// The configuration the main table uses.
pub const BASE_BACKENDS: usize = 3;
/// Flows in the table besides the benchmark's own, for the main table.
pub const BASE_FLOWS: u32 = 10;
/// The flow count the scaling target names: the default table, full.
pub const FULL_TABLE_FLOWS: u32 = MAX_FLOWS;

/// How much to measure.
#[derive(Clone, Debug, Serialize)]
pub struct MicroOptions {
    /// Runs per BPF_PROG_TEST_RUN call for the cases that repeat one packet.
    pub repeat: u32,
    /// Calls per case; the median is reported.
    pub calls: usize,
    /// Runs per call for the SYN case (bounded by the SNAT range, see the module doc).
    pub syn_batch: u32,
    /// SYN packets per configuration, over all calls.
    pub syn_packets: u64,
    /// Backend counts to compare (with BASE_FLOWS flows).
    pub backends: Vec<usize>,
    /// Flow table fills to compare (with BASE_BACKENDS backends).
    pub flows: Vec<u32>,
}

impl MicroOptions {
    /// What `cargo xtask bench` measures.
    pub fn full() -> Self {
        Self {
            repeat: 1_000_000,
            calls: 5,
            syn_batch: 20_000,
            syn_packets: 1_000_000,
            backends: vec![3, 100, 1000],
            flows: vec![BASE_FLOWS, FULL_TABLE_FLOWS, 1_000_000],
        }
    }

    /// `--quick`: fewer SYNs, same configurations.
    pub fn quick() -> Self {
        Self {
            calls: 3,
            syn_packets: 200_000,
            ..Self::full()
        }
    }

    /// The smoke test: everything once, small.
    pub fn smoke() -> Self {
        Self {
            repeat: 1000,
            calls: 1,
            syn_batch: 500,
            syn_packets: 1000,
            backends: vec![3, 100],
            flows: vec![BASE_FLOWS, 1000],
        }
    }
}

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub name: String,
    /// Median over calls of the kernel's mean time per run, ns.
    pub ns: f64,
    /// Each call's figure.
    pub calls_ns: Vec<f64>,
    /// Runs over all calls.
    pub packets: u64,
    /// ns / the XDP_PASS floor's ns.
    pub x_floor: f64,
    /// What the counters confirmed.
    pub checked: String,
}

/// Per-packet cost at one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub backends: usize,
    /// Flows in the table besides the benchmark's own.
    pub flows: u32,
    /// Connections the flow table holds (FLOWS has twice as many entries).
    pub table_entries: u32,
    pub syn: Case,
    pub established: Case,
}

/// One map's memory.
#[derive(Clone, Debug, Serialize)]
pub struct MapMem {
    pub name: String,
    #[serde(flatten)]
    pub info: MapInfo,
}

/// Memory of the maps as the agent loads them.
#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub maps: Vec<MapMem>,
    pub total_bytes: u64,
    /// (FLOWS + HALF_OPEN) / MAX_FLOWS (connections) at the default size.
    pub bytes_per_flow: f64,
    /// The same from the growth between the default and the resized tables, when measured.
    pub marginal_bytes_per_flow: Option<f64>,
    pub cpus: usize,
}

/// Everything the microbenchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct Micro {
    pub options: MicroOptions,
    pub floor: Case,
    pub not_ours: Case,
    pub syn: Case,
    pub established: Case,
    pub reply: Case,
    pub by_backends: Vec<Point>,
    pub by_flows: Vec<Point>,
    pub maps: MapMemory,
}

/// The table size used for `flows` prefilled flows: the agent's unless they do not fit.
pub fn table_entries(flows: u32, syn_batch: u32) -> u32 {
    let need = flows as u64 + syn_batch as u64 + 16;
    if need <= MAX_FLOWS as u64 * 9 / 10 {
        MAX_FLOWS
    } else {
        (need as u32).next_power_of_two()
    }
}

fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        src_addr: u32::from(src).to_be(),
        dst_addr: u32::from(dst).to_be(),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

fn fixture(backends: usize, flows: u32, syn_batch: u32) -> Result<Fixture> {
    let entries = table_entries(flows, syn_batch);
    let o = Options {
        backends: (0..backends)
            .map(|i| BackendSpec {
                name: format!("bench{:04}", i + 1),
                addr: VIP,
                port: VIP_PORT,
                mac: VIP_MAC,
            })
            .collect(),
        snat_address: CLIENT,
        snat_ports: SNAT_PORTS,
        max_flows: (entries != MAX_FLOWS).then_some(entries),
        mss_clamp: None,
        mode: "nat",
        local: Vec::new(),
    };
    let mut f = Fixture::with("bench", o).context("the microbenchmark needs root")?;
    f.prefill_flows(flows);
    Ok(f)
}

fn set_cursors(f: &Fixture, start: impl Fn(usize) -> u64) -> Result<()> {
    let mut c = f.snat_cursors();
    for (k, b) in f.vips[0].backends.iter().enumerate() {
        c.set(b.index, start(k), 0).context("SNAT_CURSOR")?;
    }
    Ok(())
}

struct Counters {
    tx: u64,
    not_ours: u64,
    packets: u64,
    replies: u64,
    new_flows: u64,
}

fn counters(f: &Fixture) -> Counters {
    let s = f.vip_stats();
    Counters {
        tx: f.reason(reason::TX),
        not_ours: f.reason(reason::PASS_NOT_OURS),
        packets: s.packets,
        replies: s.reply_packets,
        new_flows: s.new_flows,
    }
}

/// Calls `prog` `calls` times with `repeat` runs on `frame`; the kernel's mean per run each.
fn measure(
    f: &Fixture,
    prog: &Xdp,
    frame: &[u8],
    repeat: u32,
    calls: usize,
    want: u32,
) -> Result<Vec<f64>> {
    let mut ns = Vec::with_capacity(calls);
    for _ in 0..calls {
        let (v, d) = f.run_repeat(prog, frame, repeat);
        ensure!(v == want, "verdict {v}, expected {want}");
        ns.push(d.as_nanos() as f64);
    }
    Ok(ns)
}

fn case(name: &str, calls_ns: Vec<f64>, packets: u64, checked: String) -> Case {
    Case {
        name: name.to_string(),
        ns: stats::median(&calls_ns).unwrap_or(f64::NAN),
        calls_ns,
        packets,
        x_floor: f64::NAN,
        checked,
    }
}

/// Creates the flow whose packets are their own translation (see the module doc).
fn establish(f: &Fixture) -> Result<()> {
    set_cursors(f, |_| 0)?;
    let syn = Frame::tcp(
        CLIENT_MAC,
        LB_MAC,
        CLIENT,
        EST_PORT,
        VIP,
        VIP_PORT,
        TcpFlags::SYN,
    );
    let (v, out) = f.run(&syn.bytes());
    ensure!(
        v == XDP_TX,
        "the SYN of the established flow got verdict {v}"
    );
    let p = packet::parse(&out).context("rewritten SYN")?;
    ensure!(
        (p.src, p.sport, p.dst, p.dport) == (CLIENT, EST_PORT, VIP, VIP_PORT),
        "the flow's translation is not the identity: {}:{} -> {}:{}",
        p.src,
        p.sport,
        p.dst,
        p.dport
    );
    ensure!(p.ip_csum_ok && p.tcp_csum_ok, "checksums after the rewrite");
    // The backend's first packet after the handshake moves the flow to FLOWS.
    let (v, _) = f.run(&reply_frame());
    ensure!(
        v == XDP_TX,
        "the reply establishing the flow got verdict {v}"
    );
    ensure!(
        f.writer
            .maps
            .flows
            .get(&key(CLIENT, EST_PORT, VIP, VIP_PORT), 0)
            .is_ok(),
        "the flow is established"
    );
    Ok(())
}

fn reply_frame() -> Vec<u8> {
    Frame::tcp(
        VIP_MAC,
        LB_MAC,
        VIP,
        VIP_PORT,
        CLIENT,
        EST_PORT,
        TcpFlags::ACK,
    )
    .bytes()
}

fn est_frame() -> Vec<u8> {
    Frame::tcp(
        CLIENT_MAC,
        LB_MAC,
        CLIENT,
        EST_PORT,
        VIP,
        VIP_PORT,
        TcpFlags::ACK,
    )
    .bytes()
}

fn established(f: &Fixture, o: &MicroOptions) -> Result<Case> {
    let before = counters(f);
    let ns = measure(f, f.program(), &est_frame(), o.repeat, o.calls, XDP_TX)?;
    let after = counters(f);
    let n = o.repeat as u64 * o.calls as u64;
    ensure!(
        after.packets - before.packets == n
            && after.tx - before.tx == n
            && after.new_flows == before.new_flows,
        "established: {} packets forwarded, {} sent, {} new flows for {n} runs",
        after.packets - before.packets,
        after.tx - before.tx,
        after.new_flows - before.new_flows
    );
    Ok(case(
        "established flow (client -> VIP)",
        ns,
        n,
        format!("{n} forwarded by XDP_TX, 0 new flows"),
    ))
}

fn reply(f: &Fixture, o: &MicroOptions) -> Result<Case> {
    let frame = reply_frame();
    let before = counters(f);
    let ns = measure(f, f.program(), &frame, o.repeat, o.calls, XDP_TX)?;
    let after = counters(f);
    let n = o.repeat as u64 * o.calls as u64;
    ensure!(
        after.replies - before.replies == n && after.tx - before.tx == n,
        "reply: {} reverse-translated, {} sent for {n} runs",
        after.replies - before.replies,
        after.tx - before.tx
    );
    Ok(case(
        "backend's reply (reverse NAT)",
        ns,
        n,
        format!("{n} reverse-translated by XDP_TX"),
    ))
}

fn not_ours(f: &Fixture, o: &MicroOptions) -> Result<Case> {
    // SSH to the LB host itself.
    let frame = Frame::tcp(
        CLIENT_MAC,
        LB_MAC,
        CLIENT,
        40000,
        LB_ADDR,
        22,
        TcpFlags::ACK,
    )
    .bytes();
    let before = counters(f);
    let ns = measure(f, f.program(), &frame, o.repeat, o.calls, XDP_PASS)?;
    let after = counters(f);
    let n = o.repeat as u64 * o.calls as u64;
    ensure!(
        after.not_ours - before.not_ours == n,
        "not ours: {} counted as pass_not_ours for {n} runs",
        after.not_ours - before.not_ours
    );
    Ok(case(
        "packet not for any VIP",
        ns,
        n,
        format!("{n} passed as pass_not_ours"),
    ))
}

fn syn(f: &mut Fixture, o: &MicroOptions) -> Result<Case> {
    let (min, max) = SNAT_PORTS;
    let range = (max - min) as u64 + 1;
    // The established flow must not be met by a drifting SYN.
    for k in [
        key(CLIENT, EST_PORT, VIP, VIP_PORT),
        key(VIP, VIP_PORT, CLIENT, EST_PORT),
    ] {
        let _ = f.writer.maps.flows.remove(&k);
    }
    let n = f.vips[0].backends.len() as u64;
    let seg = range / n;
    // Each backend's share of a batch must stay inside its segment of the ring: the mean
    // plus six standard deviations of a binomial share.
    let mut batch = o.syn_batch as u64;
    while batch > 1 && {
        let m = batch as f64 / n as f64;
        m + 6.0 * m.sqrt() >= seg as f64
    } {
        batch /= 2;
    }
    let frame = Frame::tcp(
        CLIENT_MAC,
        LB_MAC,
        CLIENT,
        SYN_PORT,
        VIP,
        VIP_PORT,
        TcpFlags::SYN,
    )
    .bytes();
    let mut ns = Vec::new();
    let mut total = 0u64;
    while total < o.syn_packets {
        set_cursors(f, |k| k as u64 * seg)?;
        let before = counters(f);
        let exhausted = f.reason(reason::DROP_SNAT_EXHAUSTED);
        let (v, d) = f.run_repeat(f.program(), &frame, batch as u32);
        let after = counters(f);
        ensure!(v == XDP_TX, "SYN batch: last verdict {v}");
        ensure!(
            after.new_flows - before.new_flows == batch,
            "SYN batch of {batch}: {} new flows ({} SNAT exhaustions)",
            after.new_flows - before.new_flows,
            f.reason(reason::DROP_SNAT_EXHAUSTED) - exhausted
        );
        ns.push(d.as_nanos() as f64);
        total += batch;
        // Delete exactly what the batch created: the ports each ring handed out.
        let cursors = f.snat_cursors();
        let ends: Vec<u64> = f.vips[0]
            .backends
            .iter()
            .map(|b| cursors.get(&b.index, 0).unwrap_or(0))
            .collect();
        for (k, end) in ends.into_iter().enumerate() {
            for t in k as u64 * seg..end {
                let port = (min as u64 + t % range) as u16;
                let _ = f
                    .writer
                    .maps
                    .half_open
                    .remove(&key(CLIENT, port, VIP, VIP_PORT));
                let _ = f
                    .writer
                    .maps
                    .half_open
                    .remove(&key(VIP, VIP_PORT, CLIENT, port));
            }
        }
        let _ = f
            .writer
            .maps
            .half_open
            .remove(&key(CLIENT, SYN_PORT, VIP, VIP_PORT));
    }
    Ok(case(
        "SYN creating a flow",
        ns,
        total,
        format!("{total} new flows in batches of {batch}"),
    ))
}

/// A case `profile` repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileCase {
    Syn,
    Established,
    Reply,
    NotOurs,
}

/// Runs one case of the base configuration over and over for `seconds`, for `perf record`
/// to see one path of the program alone. Returns the case's median ns per packet.
pub fn profile(case: ProfileCase, seconds: u64, log: &mut dyn FnMut(&str)) -> Result<f64> {
    let o = MicroOptions::quick();
    let mut f = fixture(BASE_BACKENDS, BASE_FLOWS, o.syn_batch)?;
    establish(&f)?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut ns = Vec::new();
    while std::time::Instant::now() < until {
        let c = match case {
            ProfileCase::Syn => syn(
                &mut f,
                &MicroOptions {
                    syn_packets: 20_000,
                    ..o.clone()
                },
            )?,
            ProfileCase::Established => established(
                &f,
                &MicroOptions {
                    calls: 1,
                    ..o.clone()
                },
            )?,
            ProfileCase::Reply => reply(
                &f,
                &MicroOptions {
                    calls: 1,
                    ..o.clone()
                },
            )?,
            ProfileCase::NotOurs => not_ours(
                &f,
                &MicroOptions {
                    calls: 1,
                    ..o.clone()
                },
            )?,
        };
        log(&format!("  {}: {:.1} ns", c.name, c.ns));
        ns.push(c.ns);
    }
    stats::median(&ns).context("no round ran")
}

/// The trivial XDP_PASS program of the same object.
fn pass_program() -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(lb_agent::dataplane::OBJECT).context("load the XDP object")?;
    let p: &mut Xdp = ebpf
        .program_mut(PROG_PASS)
        .context("the XDP_PASS program")?
        .try_into()?;
    p.load().context("load XDP_PASS")?;
    Ok(ebpf)
}

/// Reads each pinned map's fdinfo.
pub fn map_infos(pin: &Path) -> Result<Vec<MapMem>> {
    map::ALL
        .iter()
        .map(|name| {
            let data = MapData::from_pin(pin.join(name)).with_context(|| format!("map {name}"))?;
            let fd = data.fd().as_fd().as_raw_fd();
            let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
            Ok(MapMem {
                name: name.to_string(),
                info: parse::map_fdinfo(&text)?,
            })
        })
        .collect()
}

fn flow_bytes(maps: &[MapMem]) -> u64 {
    maps.iter()
        .filter(|m| m.name == map::FLOWS || m.name == map::HALF_OPEN)
        .map(|m| m.info.memlock)
        .sum()
}

/// Runs the microbenchmark; `log` gets a line per result as it comes.
pub fn run(o: &MicroOptions, log: &mut dyn FnMut(&str)) -> Result<Micro> {
    let pass = pass_program()?;
    let pass_prog: &Xdp = pass.program(PROG_PASS).context("XDP_PASS")?.try_into()?;
    // The base configuration first: the floor and the main table are measured on it.
    let mut configs: Vec<(usize, u32)> = vec![(BASE_BACKENDS, BASE_FLOWS)];
    let wanted = o
        .backends
        .iter()
        .map(|&b| (b, BASE_FLOWS))
        .chain(o.flows.iter().map(|&fl| (BASE_BACKENDS, fl)));
    for c in wanted {
        if !configs.contains(&c) {
            configs.push(c);
        }
    }

    let mut main = None;
    let mut points: Vec<Point> = Vec::new();
    let mut resized_flow_bytes = None;
    for (b, fl) in configs {
        let entries = table_entries(fl, o.syn_batch);
        log(&format!(
            "micro: {b} backends, {fl} flows in tables of {entries} entries"
        ));
        let mut f = fixture(b, fl, o.syn_batch)?;
        establish(&f)?;
        if main.is_none() {
            let floor_ns = measure(&f, pass_prog, &est_frame(), o.repeat, o.calls, XDP_PASS)?;
            let n = o.repeat as u64 * o.calls as u64;
            let floor = case(
                "XDP_PASS program (floor)",
                floor_ns,
                n,
                format!("{n} passed"),
            );
            log(&format!("  floor (XDP_PASS): {:.1} ns", floor.ns));
            let not_ours = not_ours(&f, o)?;
            let reply = reply(&f, o)?;
            let maps = map_infos(f.pin_path())?;
            main = Some((floor, not_ours, reply, maps));
        }
        let established = established(&f, o)?;
        let syn = syn(&mut f, o)?;
        if entries != MAX_FLOWS && resized_flow_bytes.is_none() {
            resized_flow_bytes = Some((entries, flow_bytes(&map_infos(f.pin_path())?)));
        }
        log(&format!(
            "  established {:.1} ns, SYN {:.1} ns",
            established.ns, syn.ns
        ));
        points.push(Point {
            backends: b,
            flows: fl,
            table_entries: entries,
            syn,
            established,
        });
    }
    let (floor, mut not_ours, mut reply, maps) = main.context("no configuration measured")?;
    let fl = floor.ns;
    let x = |c: &mut Case| c.x_floor = c.ns / fl;
    x(&mut not_ours);
    x(&mut reply);
    for p in &mut points {
        x(&mut p.syn);
        x(&mut p.established);
    }
    let mut floor = floor;
    x(&mut floor);
    let base = points
        .iter()
        .find(|p| (p.backends, p.flows) == (BASE_BACKENDS, BASE_FLOWS))
        .context("base configuration")?
        .clone();
    let by_backends = o
        .backends
        .iter()
        .filter_map(|b| {
            points
                .iter()
                .find(|p| p.backends == *b && p.flows == BASE_FLOWS)
        })
        .cloned()
        .collect();
    let by_flows = o
        .flows
        .iter()
        .filter_map(|fl| {
            points
                .iter()
                .find(|p| p.flows == *fl && p.backends == BASE_BACKENDS)
        })
        .cloned()
        .collect();
    let default_flow_bytes = flow_bytes(&maps);
    let total_bytes = maps.iter().map(|m| m.info.memlock).sum();
    let maps = MapMemory {
        total_bytes,
        bytes_per_flow: default_flow_bytes as f64 / MAX_FLOWS as f64,
        marginal_bytes_per_flow: resized_flow_bytes.map(|(entries, bytes)| {
            (bytes as f64 - default_flow_bytes as f64) / (entries as f64 - MAX_FLOWS as f64)
        }),
        maps,
        cpus: aya::util::nr_cpus().unwrap_or(0),
    };
    Ok(Micro {
        options: o.clone(),
        floor,
        not_ours,
        syn: base.syn,
        established: base.established,
        reply,
        by_backends,
        by_flows,
        maps,
    })
}
