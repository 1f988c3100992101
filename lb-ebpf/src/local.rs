//! Backends on this host: lb on the control-plane nodes themselves, next to an apiserver
//! listening on 0.0.0.0. A connection Maglev gives to the local backend is not NATed (the
//! apiserver would answer the SNAT address, which is this host, and the reply would never
//! leave): the client's packet passes to the local stack still addressed to the VIP, which
//! this host holds, with only the port changed when the VIP's differs from the backend's.
//! The apiserver then answers from the VIP itself, and TC egress (`reply`) gives the reply
//! the VIP's port back. The connection's entry lives in DSR_FLOWS, like a DSR one: lb sees
//! only the client's side of it.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{
    addr_filter, addr_filter_index, flow_flags, reason, BackendInfo, Flow, FlowKey, VipInfo,
    IPPROTO_TCP,
};

use crate::{
    csum,
    decap::TC_ACT_UNSPEC,
    fib, flow, nat,
    parse::{Packet, ETH_LEN, ETH_P_IP_BE, TCP_RST},
    stats, ADDR_FILTER, DSR_FLOWS,
};

/// Opens (or, with `r` LOCAL_ADOPTED, takes over) a connection to the local backend
/// `index`: remembered in DSR_FLOWS and passed to the local stack.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn open(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    vip: &VipInfo,
    index: u32,
    backend: &BackendInfo,
    syn: bool,
    r: u32,
) -> u32 {
    let now = flow::now();
    let eth = unsafe { &*pkt.eth };
    let e = Flow {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        src_port: key.src_port,
        dst_port: backend.port,
        backend: index,
        vip: vip.index,
        flags: flow_flags::LOCAL,
        ts_delta: 0,
        // Unused (the stack routes the reply); set rather than zeroed, which LLVM would
        // turn into a memset subprogram call.
        ifindex: fib::ingress(ctx),
        dmac: eth.dst,
        smac: eth.src,
        mtu: u16::MAX as u32,
        last_seen_ns: now,
        next_hop_ns: 0,
    };
    // A RST ends whatever it belongs to: it goes on, and leaves nothing behind.
    if unsafe { (*pkt.tcp).flags } & TCP_RST == 0 {
        // Without room in the table the packet is still delivered: the entry only matters
        // once the backend set changes, or for the reply's port.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = DSR_FLOWS.insert(key, &e, 0);
        if backend.port != key.dst_port {
            let rkey = FlowKey::tcp(key.dst_addr, key.src_addr, backend.port, key.src_port);
            let mut rev = e;
            rev.flags = flow_flags::LOCAL | flow_flags::REPLY;
            rev.src_port = key.dst_port;
            #[allow(clippy::needless_borrows_for_generic_args)]
            let _ = DSR_FLOWS.insert(&rkey, &rev, 0);
        }
    }
    stats::forward(vip.index, index, nat::ip_len(pkt), syn);
    if syn {
        nat::clamp_mss(ctx, pkt, vip.mss_clamp);
    }
    deliver(pkt, backend.port, r)
}

/// Passes a client packet to the local stack with the backend's `port`.
#[inline(always)]
pub fn deliver(pkt: &Packet, port: u16, r: u32) -> u32 {
    unsafe {
        let tcp = &mut *pkt.tcp;
        if tcp.dst_port != port {
            tcp.check = csum::apply(tcp.check, csum::diff16(0, tcp.dst_port, port));
            tcp.dst_port = port;
        }
    }
    nat::pass(r)
}

/// Offsets in a frame without a VLAN tag (TC sees the tag outside the data).
const IP_AT: usize = ETH_LEN;
const IP_PROTO_AT: usize = IP_AT + 9;
const IP_FRAG_AT: usize = IP_AT + 6;
const IP_SRC_AT: usize = IP_AT + 12;
const IP_DST_AT: usize = IP_AT + 16;
/// The fragment offset bits: a later fragment has no ports.
const LATER_FRAGMENT: u16 = 0x1fffu16.to_be();
/// Size of the checksum field, as bpf_l4_csum_replace's flags give it.
const CSUM_2: u64 = 2;

/// TC egress: a local backend's reply from the backend's port gets the VIP's back.
/// Everything else goes on untouched after one array read.
#[inline(always)]
pub fn reply(ctx: &TcContext) -> i32 {
    let _ = reply_port(ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn reply_port(ctx: &TcContext) -> Result<(), ()> {
    // bpf_skb_load_bytes reads the paged part too: no pull needed for headers.
    if ctx.load::<u16>(12).map_err(|_| ())? != ETH_P_IP_BE {
        return Err(());
    }
    let src: u32 = ctx.load(IP_SRC_AT).map_err(|_| ())?;
    match ADDR_FILTER.get(addr_filter_index(src)) {
        Some(&bits) if bits & addr_filter::LOCAL_PORT != 0 => {}
        _ => return Err(()),
    }
    let version_ihl: u8 = ctx.load(IP_AT).map_err(|_| ())?;
    let proto: u8 = ctx.load(IP_PROTO_AT).map_err(|_| ())?;
    let frag: u16 = ctx.load(IP_FRAG_AT).map_err(|_| ())?;
    if version_ihl >> 4 != 4 || proto != IPPROTO_TCP || frag & LATER_FRAGMENT != 0 {
        return Err(());
    }
    let tcp_at = IP_AT + ((version_ihl & 0x0f) as usize) * 4;
    let dst: u32 = ctx.load(IP_DST_AT).map_err(|_| ())?;
    let ports: [u16; 2] = ctx.load(tcp_at).map_err(|_| ())?;
    let key = FlowKey::tcp(src, dst, ports[0], ports[1]);
    let Some(e) = (unsafe { DSR_FLOWS.get(key) }) else {
        return Err(());
    };
    let both = flow_flags::LOCAL | flow_flags::REPLY;
    if e.flags & both != both {
        return Err(());
    }
    let (port, vip, backend) = (e.src_port, e.vip, e.backend);
    // The TCP checksum is at 16 in the header; under checksum offload (CHECKSUM_PARTIAL)
    // the helper leaves it, as the port is not in the pseudo-header.
    ctx.l4_csum_replace(tcp_at + 16, ports[0] as u64, port as u64, CSUM_2)
        .map_err(|_| ())?;
    ctx.store(tcp_at, &port, 0).map_err(|_| ())?;
    let len: u16 = ctx.load(IP_AT + 2).map_err(|_| ())?;
    stats::reply(vip, backend, u16::from_be(len) as u64);
    stats::reason(reason::LOCAL_REPLY);
    Ok(())
}
