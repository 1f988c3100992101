//! Full NAT both ways: client -> VIP becomes SNAT -> backend, and the backend's reply to
//! SNAT becomes VIP -> client. Checksums are updated incrementally.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{flow_flags, reason, FlowKey, VipKey, IPPROTO_TCP};

use crate::{
    csum, fib, flow,
    parse::{self, NotTcp, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats, AGENT_META, NAT_REVERSE, VIPS,
};

/// Entry point of the LB program.
#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(e) => {
            stats::reason(match e {
                NotTcp::Truncated => reason::PASS_TRUNCATED,
                NotTcp::NotIpv4 => reason::PASS_NOT_IPV4,
                NotTcp::OtherProto => reason::PASS_NOT_TCP,
                NotTcp::LaterFragment => reason::PASS_NOT_OURS,
            });
            return xdp_action::XDP_PASS;
        }
    };
    let (ip, tcp) = unsafe { (&*pkt.ip, &*pkt.tcp) };
    let key = FlowKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: tcp.src_port,
        dst_port: tcp.dst_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let vip_key = VipKey {
        addr: ip.dst,
        port: tcp.dst_port,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    if let Some(vip) = unsafe { VIPS.get(vip_key) } {
        if !for_this_host(&pkt) {
            stats::reason(reason::PASS_OTHER_HOST);
            return xdp_action::XDP_PASS;
        }
        if pkt.fragment {
            // Only the first fragment names the port; without the rest we cannot NAT the
            // datagram, and a TCP peer doing PMTU discovery never fragments.
            stats::reason(reason::DROP_FRAGMENT);
            return xdp_action::XDP_DROP;
        }
        return forward(ctx, &pkt, &key, vip);
    }
    if let Some(rev) = NAT_REVERSE.get_ptr_mut(key) {
        if !for_this_host(&pkt) {
            stats::reason(reason::PASS_OTHER_HOST);
            return xdp_action::XDP_PASS;
        }
        return reply(ctx, &pkt, rev);
    }
    stats::reason(reason::PASS_NOT_OURS);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, vip: &lb_common::VipInfo) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let rst = flags & TCP_RST != 0;
    let close = close_flags(flags, flow_flags::FIN_CLIENT);
    let syn_tsval = if syn {
        parse::tcp_ts(ctx, pkt)
            .map(|at| pkt.tcp as usize + (at & 63))
            .filter(|&a| a + 4 <= ctx.data_end())
            .map(|a| u32::from_be_bytes(unsafe { *(a as *const [u8; 4]) }))
            .unwrap_or(0)
    } else {
        0
    };
    let d = match flow::lookup_or_create(key, vip, syn, rst, close, syn_tsval) {
        Ok(d) => d,
        Err(r) => {
            stats::reason(r);
            return xdp_action::XDP_DROP;
        }
    };
    if pkt.has_options {
        stats::reason(reason::IP_OPTIONS);
    }
    let bytes = u16::from_be(unsafe { (*pkt.ip).tot_len }) as u64;
    stats::forward(vip.index, d.backend_index, bytes, d.new_flow);
    rewrite(
        pkt,
        d.snat_addr,
        d.snat_port,
        d.backend.addr,
        d.backend.port,
    );
    if d.ts_off != 0 {
        if let Some(at) = parse::tcp_ts(ctx, pkt) {
            shift_ts(ctx, pkt, at, d.ts_off);
        }
    }
    fib::send(ctx, pkt)
}

/// Adds `delta` to the big-endian timestamp at `at` bytes into the TCP header; fixes the
/// TCP checksum.
#[inline(always)]
fn shift_ts(ctx: &XdpContext, pkt: &Packet, at: usize, delta: u32) {
    let at = at & 63;
    let addr = pkt.tcp as usize + at;
    if addr + 4 > ctx.data_end() {
        return;
    }
    let p = addr as *mut [u8; 4];
    let odd = at & 1 == 1;
    unsafe {
        let old = *p;
        let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
        *p = new;
        (*pkt.tcp).check = csum::apply32(
            (*pkt.tcp).check,
            u32::from_ne_bytes(old),
            u32::from_ne_bytes(new),
            odd,
        );
    }
}

#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, rev: *mut lb_common::ReverseValue) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    let r = flow::touch_reverse(rev, close_flags(flags, flow_flags::FIN_BACKEND));
    let bytes = u16::from_be(unsafe { (*pkt.ip).tot_len }) as u64;
    stats::reply(r.vip, r.backend, bytes);
    rewrite(pkt, r.vip_addr, r.vip_port, r.client_addr, r.client_port);
    if r.ts_off != 0 {
        if let Some(at) = parse::tcp_ts(ctx, pkt) {
            // The echo of a timestamp we shifted: shift it back for the client.
            shift_ts(ctx, pkt, at + 4, r.ts_off.wrapping_neg());
        }
    }
    fib::send(ctx, pkt)
}

/// False for a unicast frame addressed to another MAC than the interface's: a flooding
/// switch or bridge, or promiscuous mode, shows us frames another LB is meant to handle.
#[inline(always)]
fn for_this_host(pkt: &Packet) -> bool {
    let Some(meta) = AGENT_META.get(0) else {
        return true;
    };
    let dst = unsafe { (*pkt.eth).dst };
    meta.mac == [0; 6] || dst[0] & 1 == 1 || dst == meta.mac
}

#[inline(always)]
fn close_flags(tcp_flags: u8, fin: u8) -> u8 {
    let mut c = 0;
    if tcp_flags & TCP_FIN != 0 {
        c |= fin;
    }
    if tcp_flags & TCP_RST != 0 {
        c |= flow_flags::RST;
    }
    c
}

/// Rewrites addresses and ports (all network byte order) and fixes both checksums.
#[inline(always)]
fn rewrite(pkt: &Packet, src: u32, sport: u16, dst: u32, dport: u16) {
    unsafe {
        let ip = &mut *pkt.ip;
        let tcp = &mut *pkt.tcp;
        let mut d = csum::diff32(0, ip.src, src);
        d = csum::diff32(d, ip.dst, dst);
        ip.check = csum::apply(ip.check, d);
        // The TCP checksum covers the addresses through the pseudo-header.
        d = csum::diff16(d, tcp.src_port, sport);
        d = csum::diff16(d, tcp.dst_port, dport);
        tcp.check = csum::apply(tcp.check, d);
        ip.src = src;
        ip.dst = dst;
        tcp.src_port = sport;
        tcp.dst_port = dport;
    }
}
