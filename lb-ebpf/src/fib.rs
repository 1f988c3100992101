//! Next hop of a rewritten packet. Each flow entry caches its egress interface, both MACs
//! and the interface's MTU, refreshed from bpf_fib_lookup at most every NEXT_HOP_NS: the
//! lookup is about half the cost of a packet, and routes and neighbours change rarely.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};
use lb_common::{flow_flags, reason, Flow};

use crate::{flow, parse::Packet, stats, NEXT_HOP, VLAN_DEVS};

const AF_INET: u8 = 2;
/// How long a cached next hop is used before the FIB is asked again. A neighbour's new MAC
/// (a replaced host, a router failover without a virtual MAC) reaches established flows
/// within this time.
const NEXT_HOP_NS: u64 = 1_000_000_000;
/// The VLAN id bits of a TCI, network byte order.
const VID_MASK_BE: u16 = 0x0fffu16.to_be();

/// Why a packet cannot leave by XDP.
pub enum NoHop {
    /// Rewrite and pass to the kernel, counted under the reason.
    Pass(u32),
    /// Drop, counted under the reason.
    Drop(u32),
}

/// The ingress interface.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// Makes the next hop cached in `f` current for the packet `f` rewrites `pkt` into.
///
/// Towards a backend, the answer is shared by all its flows through NEXT_HOP, so a SYN and
/// the refresh of an established flow ask the FIB at most once a second per backend, not
/// per flow (two lookups were a sixth of a SYN's cost). This assumes one route per backend:
/// multipath routes hashing on ports would send all of a backend's flows one way. Towards
/// clients, each flow asks for itself.
///
/// Two FIB lookups per refresh: one with the largest length, which stops at the MTU check
/// and reports the route's MTU (a locked route MTU or the device's), then the real one for
/// the interface and MACs. Packets are then checked against the cached MTU, whatever
/// their size at the refresh.
#[inline(always)]
pub fn resolve(ctx: &XdpContext, pkt: &Packet, f: *mut Flow, now: u64) -> Result<(), NoHop> {
    let e = unsafe { &mut *f };
    if e.flags & flow_flags::NEXT_HOP != 0 && now.wrapping_sub(e.next_hop_ns) < NEXT_HOP_NS {
        return Ok(());
    }
    let shared = if e.flags & flow_flags::REPLY == 0 {
        NEXT_HOP.get_ptr_mut(e.backend)
    } else {
        None
    };
    if let Some(h) = shared {
        let h = unsafe { &*h };
        if h.addr == e.dst_addr
            && h.refreshed_ns != 0
            && now.wrapping_sub(h.refreshed_ns) < NEXT_HOP_NS
        {
            // The flow expires with the shared answer, not later.
            store(f, h.ifindex, h.mtu, &h.dmac, &h.smac, h.refreshed_ns);
            return Ok(());
        }
    }
    let mut p: FibParams = unsafe { zeroed() };
    unsafe {
        p.family = AF_INET;
        p.l4_protocol = lb_common::IPPROTO_TCP;
        p.sport = e.src_port;
        p.dport = e.dst_port;
        p.__bindgen_anon_1.tot_len = u16::MAX;
        p.__bindgen_anon_2.tos = (*pkt.ip).tos;
        p.__bindgen_anon_3.ipv4_src = e.src_addr;
        p.__bindgen_anon_4.ipv4_dst = e.dst_addr;
    }
    p.ifindex = ingress(ctx);
    let size = size_of::<FibParams>() as i32;
    let mut rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, &mut p, size, 0) } as u32;
    let mtu = if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result } as u32;
        p.__bindgen_anon_1.tot_len = 0;
        rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, &mut p, size, 0) } as u32;
        mtu
    } else {
        u16::MAX as u32
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // The FIB leaves a gateway's address here: dsr-l2 only reaches its own segment.
            if e.flags & flow_flags::DSR_L2 != 0
                && unsafe { p.__bindgen_anon_4.ipv4_dst } != e.dst_addr
            {
                return Err(NoHop::Drop(reason::DROP_DSR_NOT_ON_LINK));
            }
            store(f, p.ifindex, mtu, &p.dmac, &p.smac, now);
            if let Some(h) = shared {
                // Written only where changed, like a flow entry; the address first, so a
                // reader racing a backend's replacement sees a miss, not the old MACs.
                let h = unsafe { &mut *h };
                let dst = unsafe { &*f }.dst_addr;
                if h.addr != dst {
                    h.refreshed_ns = 0;
                    h.addr = dst;
                }
                if h.ifindex != p.ifindex {
                    h.ifindex = p.ifindex;
                }
                if h.mtu != mtu {
                    h.mtu = mtu;
                }
                set_mac(&mut h.dmac, &p.dmac);
                set_mac(&mut h.smac, &p.smac);
                h.refreshed_ns = now;
            }
            Ok(())
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(NoHop::Pass(reason::PASS_NO_NEIGH)),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(NoHop::Drop(reason::DROP_FIB_UNREACHABLE))
        }
        _ => Err(NoHop::Pass(reason::PASS_FIB_OTHER)),
    }
}

/// Writes a next hop into a flow entry, each field only when changed: other CPUs read the
/// entry without a lock.
#[inline(always)]
fn store(f: *mut Flow, ifindex: u32, mtu: u32, dmac: &[u8; 6], smac: &[u8; 6], at: u64) {
    let e = unsafe { &mut *f };
    if e.ifindex != ifindex {
        e.ifindex = ifindex;
    }
    if e.mtu != mtu {
        e.mtu = mtu;
    }
    set_mac(&mut e.dmac, dmac);
    set_mac(&mut e.smac, smac);
    e.next_hop_ns = at;
    flow::mark(f, flow_flags::NEXT_HOP);
}

/// Copies a MAC address byte by byte, and only the bytes that changed: other CPUs read the
/// entry without a lock, and an array assignment compiles to a memmove subprogram call.
#[inline(always)]
fn set_mac(to: &mut [u8; 6], from: &[u8; 6]) {
    for i in 0..6 {
        if to[i] != from[i] {
            to[i] = from[i];
        }
    }
}

/// Sends the rewritten packet, its MACs already set, to the interface `ifindex`.
///
/// XDP can only send a frame back out of the interface it came in on. So the frame leaves
/// by XDP_TX when the egress is that interface (untagged frame) or a VLAN device on it
/// (tagged frame: the tag is set to that VLAN's id). Anything else, including a VLAN the
/// NIC stripped the tag of, goes to the kernel, which forwards it: slower, but where the
/// FIB says.
#[inline(always)]
pub fn egress(ctx: &XdpContext, pkt: &Packet, ifindex: u32) -> u32 {
    match tx(pkt, ingress(ctx), ifindex) {
        Some(r) => {
            stats::reason(r);
            xdp_action::XDP_TX
        }
        None => {
            stats::reason(reason::PASS_FIB_OTHER);
            xdp_action::XDP_PASS
        }
    }
}

/// Whether a frame that came in on `ingress` can leave by XDP_TX towards `ifindex` (see
/// `egress`), with its VLAN tag set for it; the reason to count when it is sent.
#[inline(always)]
pub fn tx(pkt: &Packet, ingress: u32, ifindex: u32) -> Option<u32> {
    if pkt.tagged() {
        let v = unsafe { VLAN_DEVS.get(ifindex) }?;
        if v.parent != ingress {
            return None;
        }
        let tci = unsafe { &mut (*pkt.vlan).tci };
        if *tci & VID_MASK_BE == v.vid {
            return Some(reason::TX);
        }
        *tci = (*tci & !VID_MASK_BE) | v.vid;
        return Some(reason::TX_VLAN);
    }
    (ifindex == ingress).then_some(reason::TX)
}
