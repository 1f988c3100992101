//! Direct server return. A client packet for a DSR VIP goes to its backend unchanged but for
//! the destination MAC (dsr-l2) or inside an outer IPv4 header (dsr-ipip); the backend holds
//! the VIP itself and answers the client directly, so lb never sees a reply.
//!
//! DSR_FLOWS keeps each connection on the backend it started with when the backend set
//! changes. A packet without an entry (a backup that just took over the VIP, a restarted LB)
//! goes to the backend Maglev picks, which every LB with the same config and backend states
//! computes alike: that is the connection's backend unless the set changed since it began.
//! Any client packet but a RST makes an entry, so the next change keeps such a connection
//! too. DSR_FLOWS is apart from FLOWS: a flood can only evict DSR entries, whose
//! connections then fall back to Maglev.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{flow_flags, mode, reason, Flow, FlowKey, VipInfo};

use crate::{
    fib,
    flow::{self},
    icmp, local, nat,
    parse::{self, Ipv4Hdr, Packet, ETH_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, VLAN_LEN},
    rst, stats, DSR_FLOWS,
};

/// Size of the outer header dsr-ipip adds.
const OUTER_LEN: usize = 20;
const IPPROTO_IPIP: u8 = 4;
/// The DF bit of `frag_off`, network byte order.
const DF_BE: u16 = 0x4000u16.to_be();

/// Handles a packet whose destination address has entries in DSR_FLOWS (ADDR_FILTER says
/// so: a DSR VIP's, or a NAT VIP's with a local backend) when one is its; None otherwise.
/// A DSR VIP's packet without an entry comes back to `no_flow` once FLOWS missed too: a
/// NAT connection on the same address then pays no VIPS lookup here.
#[inline(always)]
pub fn process(ctx: &XdpContext, pkt: &Packet, key: &FlowKey) -> Option<u32> {
    let f = DSR_FLOWS.get_ptr_mut(key)?;
    if pkt.fragment {
        return Some(nat::drop(reason::DROP_FRAGMENT));
    }
    Some(on_flow(ctx, pkt, key, f))
}

/// A packet of a connection DSR_FLOWS knows.
#[inline(always)]
fn on_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, f: *mut Flow) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let e = unsafe { &*f };
    let gone = flow::backend_gone(e);
    if gone || (syn && Flow::closed(e.flags)) {
        // Its backend is dead, or a new connection reuses the tuple: pick afresh.
        let _ = DSR_FLOWS.remove(key);
        if gone && !syn && flags & TCP_RST == 0 {
            return rst::reply(ctx, pkt, reason::RST_BACKEND_DOWN);
        }
        return match nat::vip_at(key.dst_addr, key.dst_port) {
            Some(vip) if vip.mode != mode::NAT => no_flow(ctx, pkt, key, vip),
            // A NAT VIP's connection to a local backend.
            Some(_) => nat::to_new_flow(ctx),
            None => nat::pass(reason::PASS_NOT_OURS),
        };
    }
    let now = flow::now();
    // Only the client's side passes here: its FIN is taken as the end (a new SYN on the
    // tuple then picks afresh); the entry stays until the LRU needs it.
    let mut close = 0;
    if flags & TCP_FIN != 0 {
        close |= flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND;
    }
    if flags & TCP_RST != 0 {
        close |= flow_flags::RST;
    }
    if close != 0 {
        flow::mark(f, close);
        unsafe { (*f).last_seen_ns = now };
    } else {
        flow::touch(f, now);
    }
    let (vip, backend) = unsafe { ((*f).vip, (*f).backend) };
    stats::forward(vip, backend, nat::ip_len(pkt), false);
    if unsafe { (*f).flags } & flow_flags::LOCAL != 0 {
        return local::deliver(pkt, unsafe { (*f).dst_port }, reason::LOCAL);
    }
    let hop = fib::resolve(ctx, pkt, f, now);
    send(ctx, pkt, f, hop)
}

/// A packet for a DSR VIP without an entry: a SYN, or a connection another LB served.
#[inline(always)]
pub fn no_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, vip: &VipInfo) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (index, backend) = match flow::pick(key, vip) {
        Ok(p) => p,
        Err(r) => return nat::drop(r),
    };
    if !syn {
        stats::reason(reason::DSR_ADOPTED);
    }
    let now = flow::now();
    let ipip = vip.mode == mode::DSR_IPIP;
    let outer_src = if ipip {
        vip.encap_src | (flow::flow_hash(key).to_be() & vip.encap_src_mask)
    } else {
        key.src_addr
    };
    let eth = unsafe { &*pkt.eth };
    let mut e = Flow {
        src_addr: outer_src,
        dst_addr: backend.addr,
        src_port: key.src_port,
        dst_port: key.dst_port,
        backend: index,
        vip: vip.index,
        flags: if ipip {
            flow_flags::IPIP
        } else {
            flow_flags::DSR_L2
        },
        ts_delta: 0,
        // No next hop yet (no NEXT_HOP flag); the fields get the packet's values rather
        // than zeros, which LLVM would turn into a memset subprogram call.
        ifindex: fib::ingress(ctx),
        dmac: eth.dst,
        smac: eth.src,
        mtu: u16::MAX as u32,
        last_seen_ns: now,
        next_hop_ns: 0,
    };
    let hop = fib::resolve(ctx, pkt, &mut e, now);
    // A RST ends whatever it belongs to: it goes on, and leaves nothing behind.
    if flags & TCP_RST == 0 {
        // Without room in the table the packet still goes to Maglev's pick: the entry only
        // matters once the backend set changes.
        // By reference: a copy passed by value pushed the verifier past its million
        // instructions.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = DSR_FLOWS.insert(key, &e, 0);
    }
    stats::forward(vip.index, index, nat::ip_len(pkt), syn);
    if syn {
        nat::clamp_mss(ctx, pkt, vip.mss_clamp);
    }
    send(ctx, pkt, &mut e, hop)
}

/// Sends the packet to the backend `f` names, as its mode says.
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, f: *mut Flow, hop: Result<(), fib::NoHop>) -> u32 {
    let e = unsafe { &*f };
    match hop {
        Ok(()) => {}
        // The kernel would deliver a packet for the VIP to the address this host holds,
        // and its stack would reset the connection: never pass it.
        Err(fib::NoHop::Pass(_)) => return nat::drop(reason::DROP_DSR_NO_NEIGH),
        Err(fib::NoHop::Drop(r)) => return nat::drop(r),
    }
    let ipip = e.flags & flow_flags::IPIP != 0;
    let len = nat::ip_len(pkt);
    if ipip && len + OUTER_LEN as u64 > e.mtu as u64 {
        let df = unsafe { (*pkt.ip).frag_off } & DF_BE != 0;
        // icmp::too_big passes a packet with IP options to the kernel, which holds the VIP.
        if df && !pkt.has_options {
            // The sender learns the path MTU less the outer header.
            return icmp::too_big(ctx, pkt, e.mtu - OUTER_LEN as u32);
        }
        return nat::drop(reason::DROP_DSR_TOO_BIG);
    }
    parse::set_macs(pkt.eth, &e.dmac, &e.smac);
    let Some(sent) = fib::tx(pkt, fib::ingress(ctx), e.ifindex) else {
        return nat::drop(reason::DROP_DSR_EGRESS);
    };
    if ipip {
        let tos = unsafe { (*pkt.ip).tos };
        let df = unsafe { (*pkt.ip).frag_off } & DF_BE;
        let l2 = if pkt.tagged() {
            ETH_LEN + VLAN_LEN
        } else {
            ETH_LEN
        };
        if encap(ctx, l2, e.src_addr, e.dst_addr, tos, len as u16, df).is_err() {
            return nat::drop(reason::DROP_DSR_EGRESS);
        }
    }
    stats::reason(sent);
    xdp_action::XDP_TX
}

/// Puts an outer IPv4 header (`src` -> `dst`, protocol 4) in front of the IP packet of
/// `inner_len` bytes that follows an `l2`-byte link header, which moves to the front.
#[inline(always)]
fn encap(
    ctx: &XdpContext,
    l2: usize,
    src: u32,
    dst: u32,
    tos: u8,
    inner_len: u16,
    df: u16,
) -> Result<(), ()> {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, -(OUTER_LEN as i32)) } != 0 {
        return Err(());
    }
    let start = ctx.data();
    // Room for the largest link header at both places, and the outer header behind it.
    if start + OUTER_LEN + ETH_LEN + VLAN_LEN + OUTER_LEN > ctx.data_end() {
        return Err(());
    }
    for i in 0..ETH_LEN + VLAN_LEN {
        if i < l2 {
            unsafe { *((start + i) as *mut u8) = *((start + OUTER_LEN + i) as *const u8) };
        }
    }
    let Some(ip) = parse::ptr_at::<Ipv4Hdr>(ctx, l2) else {
        return Err(());
    };
    let tot_len = (inner_len + OUTER_LEN as u16).to_be();
    unsafe { &mut *ip }.fill(tos, tot_len, df, IPPROTO_IPIP, src, dst);
    Ok(())
}
