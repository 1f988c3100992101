//! ICMP for NAT flows. An error about a flow's packet (destination unreachable,
//! fragmentation needed, time exceeded) is translated like the packet it quotes, in the
//! other direction, and sent on to the host that sent that packet (RFC 5508, 4.2); a packet
//! larger than its egress MTU goes back to its sender as "fragmentation needed". Together
//! they make path MTU discovery work through lb.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use core::mem::size_of;
use lb_common::{reason, FlowKey, IPPROTO_TCP};

use crate::{
    csum, fib, flow,
    parse::{
        self, ptr_at, EthHdr, Ipv4Hdr, Packet, VlanHdr, ETH_LEN, ETH_P_IP_BE, IPPROTO_ICMP,
        VLAN_LEN,
    },
    stats,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The header of an ICMP error, and the quote lb keeps: the IP header and 8 bytes.
const ICMP_LEN: usize = 8;
const QUOTE_LEN: usize = 20 + 8;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    /// Unused, or the next-hop MTU in the low half of "fragmentation needed".
    rest: u32,
}

/// The first bytes of the quoted TCP header: ports and sequence number.
#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

#[inline(always)]
fn pass(r: u32) -> u32 {
    stats::reason(r);
    xdp_action::XDP_PASS
}

/// An ICMP message to a VIP or SNAT address.
#[inline(always)]
pub fn process(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, pkt.l4) else {
        return pass(reason::PASS_ICMP);
    };
    let kind = unsafe { (*icmp).kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return pass(reason::PASS_ICMP);
    }
    let (Some(inner), Some(ports)) = (
        ptr_at::<Ipv4Hdr>(ctx, pkt.l4 + ICMP_LEN),
        ptr_at::<Ports>(ctx, pkt.l4 + ICMP_LEN + size_of::<Ipv4Hdr>()),
    ) else {
        return pass(reason::PASS_ICMP);
    };
    let (inner, ports) = unsafe { (&mut *inner, &mut *ports) };
    if inner.version_ihl != 0x45 || inner.proto != IPPROTO_TCP {
        return pass(reason::PASS_ICMP);
    }
    // The quoted packet is one lb sent: the entry of the opposite direction rewrote it, and
    // its own rewrite, reversed, is the packet as its sender sent it.
    let key = FlowKey::tcp(inner.dst, inner.src, ports.dst, ports.src);
    let Some((f, _)) = flow::lookup(&key) else {
        return pass(reason::PASS_ICMP);
    };
    let e = unsafe { *f };
    let now = flow::now();
    let hop = fib::resolve(ctx, pkt, f, now);

    // Inner IP header, then the quoted TCP checksum when the quote reaches it (its
    // pseudo-header has the addresses), then the ICMP checksum over all of it.
    let mut d_addr = csum::diff32(0, inner.src, e.dst_addr);
    d_addr = csum::diff32(d_addr, inner.dst, e.src_addr);
    let old_ip_check = inner.check;
    inner.check = csum::apply(inner.check, d_addr);
    let mut d_icmp = csum::diff16(d_addr, old_ip_check, inner.check);
    let d_ports = csum::diff16(
        csum::diff16(0, ports.src, e.dst_port),
        ports.dst,
        e.src_port,
    );
    d_icmp += d_ports;
    let tcp_check_at = pkt.l4 + ICMP_LEN + size_of::<Ipv4Hdr>() + 16;
    if let Some(c) = ptr_at::<u16>(ctx, tcp_check_at) {
        let c = unsafe { &mut *c };
        let old = *c;
        *c = csum::apply(old, d_addr + d_ports);
        d_icmp = csum::diff16(d_icmp, old, *c);
    }
    inner.src = e.dst_addr;
    inner.dst = e.src_addr;
    ports.src = e.dst_port;
    ports.dst = e.src_port;
    unsafe { (*icmp).check = csum::apply((*icmp).check, d_icmp) };

    // The error now comes from lb's side of the flow and goes to the packet's sender.
    let ip = unsafe { &mut *pkt.ip };
    let mut d = csum::diff32(0, ip.src, e.src_addr);
    d = csum::diff32(d, ip.dst, e.dst_addr);
    ip.check = csum::apply(ip.check, d);
    ip.src = e.src_addr;
    ip.dst = e.dst_addr;
    stats::reason(reason::ICMP_TRANSLATED);
    match hop {
        Ok(()) => {
            let e = unsafe { &*f };
            parse::set_macs(pkt.eth, &e.dmac, &e.smac);
            fib::egress(ctx, pkt, e.ifindex)
        }
        Err(fib::NoHop::Pass(_)) => xdp_action::XDP_PASS,
        Err(fib::NoHop::Drop(r)) => {
            stats::reason(r);
            xdp_action::XDP_DROP
        }
    }
}

/// Turns `pkt` (as it arrived, not rewritten, DF set) into "fragmentation needed, next-hop
/// MTU `mtu`" back to its sender, quoting its IP header and first 8 bytes.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> u32 {
    if pkt.has_options {
        return pass(reason::PASS_FIB_OTHER);
    }
    let (eth, ip) = unsafe { (&*pkt.eth, &*pkt.ip) };
    let (mac_src, mac_dst) = (eth.src, eth.dst);
    let (to, from) = (ip.src, ip.dst);
    let tagged = pkt.tagged();
    let (vlan_proto, tci) = if tagged {
        unsafe { ((*pkt.eth).proto, (*pkt.vlan).tci) }
    } else {
        (0, 0)
    };
    let l2 = if tagged { ETH_LEN + VLAN_LEN } else { ETH_LEN };
    // Room in front for the new IP and ICMP headers: the old frame's IP header then sits
    // exactly where the quote goes.
    let grow = (size_of::<Ipv4Hdr>() + ICMP_LEN) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, -grow) } != 0 {
        return pass(reason::PASS_FIB_OTHER);
    }
    let quote_at = l2 + size_of::<Ipv4Hdr>() + ICMP_LEN;
    let (Some(eth), Some(ip), Some(icmp), Some(quote)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, l2),
        ptr_at::<IcmpHdr>(ctx, l2 + size_of::<Ipv4Hdr>()),
        ptr_at::<[u16; QUOTE_LEN / 2]>(ctx, quote_at),
    ) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        (*eth).dst = mac_src;
        (*eth).src = mac_dst;
        if tagged {
            let Some(v) = ptr_at::<VlanHdr>(ctx, ETH_LEN) else {
                return xdp_action::XDP_DROP;
            };
            (*eth).proto = vlan_proto;
            (*v).tci = tci;
            (*v).proto = ETH_P_IP_BE;
        } else {
            (*eth).proto = ETH_P_IP_BE;
        }
    }
    let tot_len = ((size_of::<Ipv4Hdr>() + ICMP_LEN + QUOTE_LEN) as u16).to_be();
    // Internetwork control precedence, as the kernel's own ICMP errors.
    unsafe { &mut *ip }.fill(0xc0, tot_len, 0, IPPROTO_ICMP, from, to);

    // Bytes 4..8: two unused, then the MTU.
    let m = (mtu.min(u16::MAX as u32) as u16).to_be_bytes();
    let icmp = unsafe { &mut *icmp };
    icmp.kind = ICMP_DEST_UNREACH;
    icmp.code = ICMP_FRAG_NEEDED;
    icmp.rest = u32::from_ne_bytes([0, 0, m[0], m[1]]);
    let mut s = u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]) as u32;
    s = csum::add32(s, icmp.rest);
    let quote = unsafe { &*quote };
    for w in quote.iter() {
        s += *w as u32;
    }
    icmp.check = csum::finish(s);

    let end = quote_at + QUOTE_LEN;
    let extra = ctx.data_end() - (ctx.data() + end);
    if extra > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx as *mut _, -(extra as i32)) } != 0 {
        return xdp_action::XDP_DROP;
    }
    stats::reason(reason::ICMP_FRAG_NEEDED_SENT);
    xdp_action::XDP_TX
}
