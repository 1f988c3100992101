//! Full NAT both ways: client -> VIP becomes SNAT -> backend, and the backend's reply to
//! SNAT becomes VIP -> client. Each direction has its own flow entry holding the rewrite;
//! checksums are updated incrementally.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    addr_filter, addr_filter_index, backend_info_flags, flow_flags, mode, reason, tail, Flow,
    FlowKey, VipInfo, VipKey, IPPROTO_TCP,
};

use crate::{
    csum, dsr, fib,
    flow::{self, Table},
    icmp, local,
    parse::{self, NotOurs, Packet, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rst, stats, ADDR_FILTER, AGENT_META, PROGS, VIPS,
};

/// Entry point of the LB program.
#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let (pkt, l4) = match parse::parse(ctx) {
        Ok(p) => p,
        Err(e) => {
            stats::reason(match e {
                NotOurs::Truncated => reason::PASS_TRUNCATED,
                NotOurs::NotIpv4 => reason::PASS_NOT_IPV4,
            });
            return xdp_action::XDP_PASS;
        }
    };
    // Most traffic on an LB host is not for lb: one array read lets it pass.
    let dst = unsafe { (*pkt.ip).dst };
    let bits = match ADDR_FILTER.get(addr_filter_index(dst)) {
        Some(&n) if n != 0 => n,
        _ => {
            stats::reason(reason::PASS_NOT_OURS);
            return xdp_action::XDP_PASS;
        }
    };
    match l4 {
        L4::Tcp => {}
        L4::LaterFragment => return pass(reason::PASS_FRAGMENT),
        L4::Icmp if for_this_host(&pkt) => return icmp::process(ctx, &pkt),
        L4::Icmp => return pass(reason::PASS_OTHER_HOST),
        L4::Other => return pass(reason::PASS_NOT_TCP),
    }
    if !for_this_host(&pkt) {
        return pass(reason::PASS_OTHER_HOST);
    }
    let tcp = unsafe { &*pkt.tcp };
    let key = FlowKey::tcp(unsafe { (*pkt.ip).src }, dst, tcp.src_port, tcp.dst_port);
    if bits & addr_filter::DSR != 0 {
        if let Some(action) = dsr::process(ctx, &pkt, &key) {
            return action;
        }
    }
    if let Some((f, table)) = flow::lookup(&key) {
        if pkt.fragment {
            // Only the first fragment names the ports; the rest could not follow it. A TCP
            // stack doing PMTU discovery (all of them) never fragments.
            return drop(reason::DROP_FRAGMENT);
        }
        return on_flow(ctx, &pkt, &key, f, table);
    }
    let Some(vip) = vip_of(&key) else {
        return pass(reason::PASS_NOT_OURS);
    };
    if pkt.fragment {
        return drop(reason::DROP_FRAGMENT);
    }
    if vip.mode != mode::NAT {
        return dsr::no_flow(ctx, &pkt, &key, vip);
    }
    to_new_flow(ctx)
}

/// Hands a client packet for a VIP, without a flow, to PROG_NEW_FLOW. Its own program: the
/// verifier then walks the new-flow path once, not once per state of the lookups before.
#[inline(always)]
pub fn to_new_flow(ctx: &XdpContext) -> u32 {
    // Returns only when PROGS lacks the program (the agent could not fill it).
    unsafe { PROGS.tail_call(ctx, tail::NEW_FLOW) };
    drop(reason::DROP_TAIL_CALL)
}

/// Entry point of PROG_NEW_FLOW: the packet `process` found no flow for, parsed again.
#[inline(always)]
pub fn process_new(ctx: &XdpContext) -> u32 {
    let Ok((pkt, L4::Tcp)) = parse::parse(ctx) else {
        return pass(reason::PASS_NOT_OURS);
    };
    let tcp = unsafe { &*pkt.tcp };
    let key = FlowKey::tcp(
        unsafe { (*pkt.ip).src },
        unsafe { (*pkt.ip).dst },
        tcp.src_port,
        tcp.dst_port,
    );
    match vip_of(&key) {
        Some(vip) => no_flow(ctx, &pkt, &key, vip),
        None => pass(reason::PASS_NOT_OURS),
    }
}

/// The VIP a client packet with `key` is for.
#[inline(always)]
fn vip_of(key: &FlowKey) -> Option<&'static VipInfo> {
    vip_at(key.dst_addr, key.dst_port)
}

/// The TCP VIP at `addr`:`port` (network byte order).
#[inline(always)]
pub fn vip_at(addr: u32, port: u16) -> Option<&'static VipInfo> {
    let vip_key = VipKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    unsafe { VIPS.get(vip_key) }
}

#[inline(always)]
pub fn pass(r: u32) -> u32 {
    stats::reason(r);
    xdp_action::XDP_PASS
}

#[inline(always)]
pub fn drop(r: u32) -> u32 {
    stats::reason(r);
    xdp_action::XDP_DROP
}

/// A client packet for a VIP without a flow: only a SYN creates one; nothing else creates
/// any state.
#[inline(always)]
fn no_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, vip: &VipInfo) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    if flags & TCP_RST != 0 {
        return drop(reason::DROP_RST_NO_FLOW);
    }
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return new_flow(ctx, pkt, key, vip);
    }
    // A connection to a local backend needs no state but the port: one whose entry was
    // lost (evicted, a restart with new maps) goes on where Maglev still sends it. Only
    // addresses whose VIPs have one pay the pick (the DSR bit: a stray ACK flood at a plain
    // NAT VIP costs what it did).
    let may_be_local = ADDR_FILTER
        .get(addr_filter_index(key.dst_addr))
        .is_some_and(|&b| b & addr_filter::DSR != 0);
    if may_be_local {
        if let Ok((index, backend)) = flow::pick(key, vip) {
            if backend.flags & backend_info_flags::LOCAL != 0 {
                return local::open(
                    ctx,
                    pkt,
                    key,
                    vip,
                    index,
                    &backend,
                    false,
                    reason::LOCAL_ADOPTED,
                );
            }
        }
    }
    rst::reply(ctx, pkt, reason::RST_NO_FLOW)
}

#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, vip: &VipInfo) -> u32 {
    let (index, backend) = match flow::pick(key, vip) {
        Ok(p) => p,
        Err(r) => return drop(r),
    };
    if backend.flags & backend_info_flags::LOCAL != 0 {
        return local::open(ctx, pkt, key, vip, index, &backend, true, reason::LOCAL);
    }
    // Here, before the flow is made: the verifier walks the option loop once for every
    // state that reaches it (30k instructions here, 240k after the next hop lookup). A SYN
    // dropped below still counts as clamped.
    clamp_mss(ctx, pkt, vip.mss_clamp);
    let now = flow::now();
    let tsval = parse::tcp_ts(ctx, pkt)
        .map(|at| pkt.tcp as usize + (at & 63))
        .filter(|&a| a + 4 <= ctx.data_end())
        .map(|a| u32::from_be_bytes(unsafe { *(a as *const [u8; 4]) }))
        .unwrap_or(0);
    let eth = unsafe { &*pkt.eth };
    let reply_hop = flow::ReplyHop {
        dmac: eth.src,
        smac: eth.dst,
        ifindex: fib::ingress(ctx),
        usable: !pkt.tagged(),
    };
    let mut fwd = match flow::create(key, vip, index, &backend, tsval, &reply_hop, now) {
        Ok(f) => f,
        Err(r) => return drop(r),
    };
    // The next hop goes into the entry before it is inserted; a route that does not work
    // still leaves the flow in place for the SYN's retransmission.
    let hop = fib::resolve(ctx, pkt, &mut fwd, now);
    if let Err(r) = flow::insert_forward(key, &fwd) {
        return drop(r);
    }
    stats::forward(vip.index, fwd.backend, ip_len(pkt), true);
    send(ctx, pkt, &mut fwd, hop)
}

/// A packet of a connection lb knows.
#[inline(always)]
fn on_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, f: *mut Flow, table: Table) -> u32 {
    let flags = unsafe { (*pkt.tcp).flags };
    let now = flow::now();
    let entry = unsafe { &*f };
    let reply = entry.flags & flow_flags::REPLY != 0;
    if !reply {
        let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let gone = flow::backend_gone(entry);
        if gone || (syn && Flow::closed(entry.flags)) {
            // Its backend is dead, or the client reuses the tuple of a connection that
            // ended: forget it, and treat the packet as one without a flow.
            let copy = *entry;
            flow::remove(table, key, &copy);
            if gone && !syn && flags & TCP_RST == 0 {
                return rst::reply(ctx, pkt, reason::RST_BACKEND_DOWN);
            }
            return match vip_of(key) {
                Some(_) => to_new_flow(ctx),
                None => pass(reason::PASS_NOT_OURS),
            };
        }
    }
    let mut close = 0;
    if flags & TCP_FIN != 0 {
        close |= if reply {
            flow_flags::FIN_BACKEND
        } else {
            flow_flags::FIN_CLIENT
        };
    }
    if flags & TCP_RST != 0 {
        close |= flow_flags::RST;
    }
    if close != 0 {
        flow::close(table, f, close, now);
    } else {
        flow::touch(f, now);
    }
    let mut f = f;
    if reply && table == Table::HalfOpen && flags & (TCP_SYN | TCP_RST) == 0 {
        // The backend answered past its SYN-ACK: the client completed the handshake.
        let copy = unsafe { *f };
        match flow::promote(key, &copy) {
            Some(p) => f = p,
            None => return send_copy(ctx, pkt, copy, now),
        }
    }
    let (vip, backend) = unsafe { ((*f).vip, (*f).backend) };
    if reply {
        stats::reply(vip, backend, ip_len(pkt));
    } else {
        stats::forward(vip, backend, ip_len(pkt), false);
    }
    if flags & TCP_SYN != 0 {
        clamp_known(ctx, pkt, key, unsafe { &*f }, reply);
    }
    let hop = fib::resolve(ctx, pkt, f, now);
    send(ctx, pkt, f, hop)
}

/// Sends with a copy of an entry that left the table under us (a promotion that lost a
/// race); its next hop is refreshed on the copy.
#[inline(always)]
fn send_copy(ctx: &XdpContext, pkt: &Packet, mut copy: Flow, now: u64) -> u32 {
    let hop = fib::resolve(ctx, pkt, &mut copy, now);
    send(ctx, pkt, &mut copy, hop)
}

#[inline(always)]
pub fn ip_len(pkt: &Packet) -> u64 {
    u16::from_be(unsafe { (*pkt.ip).tot_len }) as u64
}

/// Rewrites the packet as `f` says and sends it to the next hop `hop` resolved.
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, f: *mut Flow, hop: Result<(), fib::NoHop>) -> u32 {
    let e = unsafe { &*f };
    if pkt.has_options {
        stats::reason(reason::IP_OPTIONS);
    }
    match hop {
        Ok(()) => {}
        Err(fib::NoHop::Pass(r)) => {
            rewrite(ctx, pkt, e);
            return pass(r);
        }
        Err(fib::NoHop::Drop(r)) => return drop(r),
    }
    if ip_len(pkt) > e.mtu as u64 {
        let df = unsafe { (*pkt.ip).frag_off } & 0x4000u16.to_be() != 0;
        if df {
            // Answered from the packet as it came, so the sender recognises its own.
            return icmp::too_big(ctx, pkt, e.mtu);
        }
        // May be fragmented: the kernel does it.
        rewrite(ctx, pkt, e);
        return pass(reason::PASS_FIB_OTHER);
    }
    rewrite(ctx, pkt, e);
    parse::set_macs(pkt.eth, &e.dmac, &e.smac);
    fib::egress(ctx, pkt, e.ifindex)
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

/// Rewrites addresses and ports as `f` says, shifts the timestamp option, fixes both
/// checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, f: &Flow) {
    unsafe {
        let ip = &mut *pkt.ip;
        let tcp = &mut *pkt.tcp;
        let mut d = csum::diff32(0, ip.src, f.src_addr);
        d = csum::diff32(d, ip.dst, f.dst_addr);
        ip.check = csum::apply(ip.check, d);
        // The TCP checksum covers the addresses through the pseudo-header.
        d = csum::diff16(d, tcp.src_port, f.src_port);
        d = csum::diff16(d, tcp.dst_port, f.dst_port);
        tcp.check = csum::apply(tcp.check, d);
        ip.src = f.src_addr;
        ip.dst = f.dst_addr;
        tcp.src_port = f.src_port;
        tcp.dst_port = f.dst_port;
    }
    if f.ts_delta != 0 {
        if let Some(at) = parse::tcp_ts(ctx, pkt) {
            // Towards the backend the client's TSval moves to our clock; towards the client
            // the backend's echo of it moves back.
            let at = if f.flags & flow_flags::REPLY != 0 {
                at + 4
            } else {
                at
            };
            shift_ts(ctx, pkt, at, f.ts_delta);
        }
    }
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

/// Clamps the MSS of a handshake segment of a connection lb knows: the backend's SYN-ACK,
/// or the client's SYN retransmitted (the first may never have reached the backend). Its
/// VIP is where a client packet goes, or where a reply is rewritten to come from; only SYNs
/// pay for the lookup.
#[inline(always)]
fn clamp_known(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, f: &Flow, reply: bool) {
    let vip = if reply {
        vip_at(f.src_addr, f.src_port)
    } else {
        vip_of(key)
    };
    if let Some(vip) = vip {
        clamp_mss(ctx, pkt, vip.mss_clamp);
    }
}

/// Lowers the packet's MSS option to `clamp` (0: no clamp) when it announces more; fixes
/// the TCP checksum. Independent of the address rewrite: it changes other bytes, and the
/// checksum update of each commutes with the other's.
#[inline(always)]
pub fn clamp_mss(ctx: &XdpContext, pkt: &Packet, clamp: u16) {
    if clamp == 0 {
        return;
    }
    let Some(at) = parse::tcp_mss(ctx, pkt) else {
        return;
    };
    let at = at & 63;
    let addr = pkt.tcp as usize + at;
    if addr + 2 > ctx.data_end() {
        return;
    }
    // Byte by byte: the option may sit at an odd address.
    let p = addr as *mut u8;
    unsafe {
        let old = [*p, *p.add(1)];
        if u16::from_be_bytes(old) <= clamp {
            return;
        }
        let new = clamp.to_be_bytes();
        *p = new[0];
        *p.add(1) = new[1];
        (*pkt.tcp).check = csum::apply16(
            (*pkt.tcp).check,
            u16::from_ne_bytes(old),
            u16::from_ne_bytes(new),
            at & 1 == 1,
        );
    }
    stats::reason(reason::MSS_CLAMPED);
}
