//! IPIP decapsulation at TC ingress, for apiserver hosts whose kernel has no ipip device
//! (`lb-agent backend-setup --mode dsr-ipip` falls back to it): the LB's outer IPv4 header
//! is removed and the client's packet, addressed to the VIP on `lo`, goes up the stack as
//! if it had arrived unencapsulated.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    programs::TcContext,
};
use core::mem::size_of;

use crate::parse::{EthHdr, Ipv4Hdr, ETH_LEN, ETH_P_IP_BE};

/// Continue with the next filter, or pass when there is none: the program takes no
/// decision, so whatever else is attached on the hook still runs.
pub const TC_ACT_UNSPEC: i32 = -1;

const IPPROTO_IPIP: u8 = 4;
/// Version 4, IHL 5: the only outer header the LB writes.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// The fragment offset and MF bits: a fragment cannot be decapsulated on its own.
const FRAGMENTED: u16 = 0x3fffu16.to_be();
const OUTER_LEN: usize = size_of::<Ipv4Hdr>();
/// Outer Ethernet and IPv4 headers and the inner header's first byte: what must be read.
const NEEDED: usize = ETH_LEN + OUTER_LEN + 1;

/// Strips the outer IPv4 header of an IPv4-in-IPv4 packet; everything else is untouched.
#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    if !is_ipip(ctx) {
        return TC_ACT_UNSPEC;
    }
    // FIXED_GSO: a GRO'd packet's segments carry as much payload as before, so its gso_size
    // stays. DECAP_L3_IPV4 (Linux 6.3) also clears the skb's IPIP GSO type; older kernels
    // refuse the flag, and without it the packet is still delivered correctly.
    let fixed = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
    let decap = fixed | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64;
    let len = -(OUTER_LEN as i32);
    if ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, decap).is_err() {
        let _ = ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, fixed);
    }
    TC_ACT_UNSPEC
}

/// An unfragmented IPv4 packet with a 20-byte header carrying IPv4.
#[inline(always)]
fn is_ipip(ctx: &TcContext) -> bool {
    // Headers may sit in the skb's paged part (a GRO'd packet): pull them into the linear
    // part that direct access covers. A packet too short for them fails the pull.
    if ctx.data() + NEEDED > ctx.data_end() && ctx.pull_data(NEEDED as u32).is_err() {
        return false;
    }
    // The pull moved data and data_end: read both again and check every access.
    let start = ctx.data();
    let end = ctx.data_end();
    if start + NEEDED > end {
        return false;
    }
    let eth = start as *const EthHdr;
    let ip = (start + ETH_LEN) as *const Ipv4Hdr;
    let inner_version = (start + ETH_LEN + OUTER_LEN) as *const u8;
    unsafe {
        (*eth).proto == ETH_P_IP_BE
            && (*ip).version_ihl == IPV4_NO_OPTIONS
            && (*ip).proto == IPPROTO_IPIP
            && (*ip).frag_off & FRAGMENTED == 0
            && *inner_version >> 4 == 4
    }
}
