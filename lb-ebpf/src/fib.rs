//! Next hop of a rewritten packet: bpf_fib_lookup gives the egress interface and both MACs.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};
use lb_common::reason;

use crate::{parse::Packet, stats};

const AF_INET: u8 = 2;

/// Sends the already rewritten packet towards its new destination.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut p: FibParams = unsafe { zeroed() };
    unsafe {
        p.family = AF_INET;
        p.l4_protocol = (*pkt.ip).proto;
        p.sport = (*pkt.tcp).src_port;
        p.dport = (*pkt.tcp).dst_port;
        p.__bindgen_anon_1.tot_len = u16::from_be((*pkt.ip).tot_len);
        p.__bindgen_anon_2.tos = (*pkt.ip).tos;
        p.__bindgen_anon_3.ipv4_src = (*pkt.ip).src;
        p.__bindgen_anon_4.ipv4_dst = (*pkt.ip).dst;
    }
    p.ifindex = ingress;
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, &mut p, size_of::<FibParams>() as i32, 0) }
        as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            unsafe {
                (*pkt.eth).dst = p.dmac;
                (*pkt.eth).src = p.smac;
            }
            // A tagged frame keeps its tag and leaves where it came in: the route lookup
            // names the VLAN device, which cannot take redirected frames.
            if pkt.tagged || p.ifindex == ingress {
                stats::reason(reason::TX);
                xdp_action::XDP_TX
            } else {
                stats::reason(reason::REDIRECT);
                unsafe { bpf_redirect(p.ifindex, 0) as u32 }
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            stats::reason(reason::PASS_NO_NEIGH);
            xdp_action::XDP_PASS
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            stats::reason(reason::DROP_FIB_UNREACHABLE);
            xdp_action::XDP_DROP
        }
        _ => {
            stats::reason(reason::PASS_FIB_OTHER);
            xdp_action::XDP_PASS
        }
    }
}
