//! Stateless resets: a client segment lb has no connection for is answered as the kernel
//! answers a segment for no socket (RFC 9293, 3.10.7.1), from the frame itself, so an ACK
//! flood costs no state and a client of a connection lb lost reconnects at once.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use core::mem::size_of;
use lb_common::reason;

use crate::{
    csum,
    parse::{Ipv4Hdr, Packet, TcpHdr, TCP_ACK, TCP_RST},
    stats,
};

/// Turns the segment into `<SEQ=SEG.ACK><CTL=RST>` back to its sender and sends it out where
/// it came in. Segments without ACK and segments with IP options are dropped instead.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, counted_as: u32) -> u32 {
    let (ip, tcp) = unsafe { (&mut *pkt.ip, &mut *pkt.tcp) };
    if tcp.flags & TCP_ACK == 0 || pkt.has_options {
        stats::reason(reason::DROP_NO_FLOW);
        return xdp_action::XDP_DROP;
    }
    unsafe {
        let eth = &mut *pkt.eth;
        core::mem::swap(&mut eth.src, &mut eth.dst);
    }
    let (src, dst) = (ip.dst, ip.src);
    let tot_len = ((size_of::<Ipv4Hdr>() + size_of::<TcpHdr>()) as u16).to_be();
    let df = 0x4000u16.to_be();
    ip.fill(0, tot_len, df, lb_common::IPPROTO_TCP, src, dst);

    let (sport, dport, seq) = (tcp.dst_port, tcp.src_port, tcp.ack_seq);
    let doff_flags = u16::from_ne_bytes([(size_of::<TcpHdr>() as u8 / 4) << 4, TCP_RST]);
    tcp.src_port = sport;
    tcp.dst_port = dport;
    tcp.seq = seq;
    tcp.ack_seq = 0;
    tcp.doff_res = (size_of::<TcpHdr>() as u8 / 4) << 4;
    tcp.flags = TCP_RST;
    tcp.window = 0;
    tcp.urg_ptr = 0;
    // Pseudo-header (addresses, protocol, length) and the header: no payload is left.
    let mut s = u16::from_ne_bytes([0, lb_common::IPPROTO_TCP]) as u32
        + (size_of::<TcpHdr>() as u16).to_be() as u32;
    s = csum::add32(csum::add32(s, src), dst);
    s += sport as u32 + dport as u32 + doff_flags as u32;
    s = csum::add32(s, seq);
    tcp.check = csum::finish(s);

    let end = pkt.tcp as usize + size_of::<TcpHdr>();
    let extra = ctx.data_end() - end;
    if extra > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx as *mut _, -(extra as i32)) } != 0 {
        stats::reason(reason::DROP_NO_FLOW);
        return xdp_action::XDP_DROP;
    }
    stats::reason(counted_as);
    xdp_action::XDP_TX
}
