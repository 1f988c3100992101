//! lb's data plane: an XDP program that full-NATs TCP connections for VIPs to backends chosen
//! by Maglev, and translates the backends' replies back, or (DSR VIPs) hands the client's
//! packets to the backend, which answers the client itself. Everything else passes untouched.
//!
//! One module per concern: `parse` (headers, bounds checks), `csum` (incremental checksums),
//! `flow` (flow tables and SNAT port allocation), `nat` (rewrite both ways), `dsr` (direct
//! server return: MAC rewrite or IPIP), `local` (backends on this host: pass to the
//! stack, and the reply's port at TC egress), `icmp` (errors about flows, "fragmentation
//! needed"), `rst` (stateless resets), `fib` (next hop, cached per flow), `stats` (per-CPU
//! counters); `decap` is the TC program `lb-agent backend-setup` attaches on dsr-ipip
//! backends whose kernel has no ipip device. This file holds the maps and the entry points:
//! lb_xdp tail-calls lb_xdp_new_flow for packets without a flow, so that the verifier,
//! whose budget the whole program nearly filled, checks the two paths apart.
#![no_std]
#![no_main]
// atomic_xadd: the BPF target has no core::sync::atomic types.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Dead code here is a check that never runs: make it an error.
#![deny(unused)]

mod csum;
mod decap;
mod dsr;
mod events;
mod fib;
mod flow;
mod icmp;
mod local;
mod nat;
mod parse;
mod rst;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    reason, tail, AgentMeta, BackendInfo, BackendMeta, EventRate, Flow, FlowKey, NextHop,
    SockRevNat, TickClock, TrafficStats, VipInfo, VipKey, VipMeta, VlanDev, ADDR_FILTER_SIZE,
    MAX_BACKENDS, MAX_FLOWS, MAX_HALF_OPEN, MAX_MAGLEV_SIZE, MAX_SOCK_REVNAT, MAX_VIPS,
    MAX_VLAN_DEVS,
};

// Map statics are named exactly as lb_common::map's constants; the agent finds them by name.
#[map]
static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(MAX_VIPS * 2 * MAX_MAGLEV_SIZE, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(2 * MAX_FLOWS, 0);
#[map]
static HALF_OPEN: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_HALF_OPEN, 0);
#[map]
static DSR_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static ADDR_FILTER: Array<u32> = Array::with_max_entries(ADDR_FILTER_SIZE, 0);
#[map]
static VLAN_DEVS: HashMap<u32, VlanDev> = HashMap::with_max_entries(MAX_VLAN_DEVS, 0);
#[map]
static STATS_VIP: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static STATS_BACKEND: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static STATS_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);
#[map]
static NEXT_HOP: Array<NextHop> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static CLOCK: PerCpuArray<TickClock> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SNAT_CURSOR: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static SOCK_REVNAT: LruHashMap<u64, SockRevNat> = LruHashMap::with_max_entries(MAX_SOCK_REVNAT, 0);
// Read only by the agent and `lb-agent status`; declared here so the object carries them.
#[map]
static VIP_META: Array<VipMeta> = Array::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_META: Array<BackendMeta> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static AGENT_META: Array<AgentMeta> = Array::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(lb_common::event::RING_BYTES, 0);
#[map]
static EVENT_RATE: PerCpuArray<EventRate> = PerCpuArray::with_max_entries(reason::COUNT, 0);
// Filled by the agent with this object's programs; pinned apart from the maps (PROGS_PIN).
#[map]
static PROGS: ProgramArray = ProgramArray::with_max_entries(tail::COUNT, 0);

/// The load balancer. Inlined into the section's entry function that `#[xdp]` wraps it
/// in: a BPF-to-BPF call and its return (through the SRSO return thunk here) per packet.
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    nat::process(&ctx)
}

/// A client packet without a flow, tail-called from lb_xdp: a SYN picks a backend here.
#[xdp]
#[inline(always)]
pub fn lb_xdp_new_flow(ctx: XdpContext) -> u32 {
    nat::process_new(&ctx)
}

/// TC egress on the XDP interface: a local backend's replies get the VIP's port back.
#[aya_ebpf::macros::classifier]
pub fn lb_tc_local(ctx: aya_ebpf::programs::TcContext) -> i32 {
    local::reply(&ctx)
}

/// cgroup connect4 of socket-mode VIPs: the connect() goes to a backend.
#[aya_ebpf::macros::cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// cgroup getpeername4: a redirected socket reports the VIP as its peer.
#[aya_ebpf::macros::cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
    sock::getpeername4(&ctx)
}

/// Passes everything: the floor for the microbenchmark, and the program the lab attaches to
/// veth bridge ports so that XDP_TX frames from the LB's veth are delivered.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// TC ingress on DSR backends whose kernel has no ipip device: strips the LB's outer IPv4
/// header (`lb-agent backend-setup --mode dsr-ipip` attaches it).
#[aya_ebpf::macros::classifier]
pub fn lb_tc_decap(ctx: aya_ebpf::programs::TcContext) -> i32 {
    decap::process(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
