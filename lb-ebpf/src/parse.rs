//! Header layouts and bounds-checked access to the packet.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

use crate::csum;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
/// EtherTypes in network byte order, as read raw from the frame.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

/// Writes a frame's MAC addresses as 16-bit stores (EthHdr is 2-aligned): an array
/// assignment compiles to a call of a byte-by-byte memmove subprogram, which cost a tenth
/// of an established packet.
#[inline(always)]
pub fn set_macs(eth: *mut EthHdr, dst: &[u8; 6], src: &[u8; 6]) {
    let p = eth as *mut u16;
    unsafe {
        *p = u16::from_ne_bytes([dst[0], dst[1]]);
        *p.add(1) = u16::from_ne_bytes([dst[2], dst[3]]);
        *p.add(2) = u16::from_ne_bytes([dst[4], dst[5]]);
        *p.add(3) = u16::from_ne_bytes([src[0], src[1]]);
        *p.add(4) = u16::from_ne_bytes([src[2], src[3]]);
        *p.add(5) = u16::from_ne_bytes([src[4], src[5]]);
    }
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

impl Ipv4Hdr {
    /// Writes a header lb sends itself (an ICMP error, a reset, dsr-ipip's outer header):
    /// no options, TTL 64, id 0, the checksum computed. `tot_len` and `frag_off` are in
    /// network byte order.
    #[inline(always)]
    pub fn fill(&mut self, tos: u8, tot_len: u16, frag_off: u16, proto: u8, src: u32, dst: u32) {
        self.version_ihl = 0x45;
        self.tos = tos;
        self.tot_len = tot_len;
        self.id = 0;
        self.frag_off = frag_off;
        self.ttl = 64;
        self.proto = proto;
        self.src = src;
        self.dst = dst;
        let mut s = u16::from_ne_bytes([0x45, tos]) as u32
            + tot_len as u32
            + frag_off as u32
            + u16::from_ne_bytes([64, proto]) as u32;
        s = csum::add32(csum::add32(s, src), dst);
        self.check = csum::finish(s);
    }
}

#[repr(C)]
pub struct TcpHdr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

/// A pointer to a `T` at `offset`, or None when the frame is too short: the one place that
/// checks against data_end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Headers of an IPv4 packet, all bounds-checked; `tcp` only for TCP first fragments.
pub struct Packet {
    pub eth: *mut EthHdr,
    /// The 802.1Q/802.1ad tag, or null.
    pub vlan: *mut VlanHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the L4 header from the start of the frame.
    pub l4: usize,
    pub tcp: *mut TcpHdr,
    /// The IPv4 header has options (IHL > 5).
    pub has_options: bool,
    /// MF set (a first fragment: the TCP header is there, the rest is not).
    pub fragment: bool,
}

/// What parsing found when it is not an IPv4 packet lb could serve.
pub enum NotOurs {
    /// Shorter than its headers: pass untouched.
    Truncated,
    /// Not IPv4.
    NotIpv4,
}

/// What the IPv4 header says about the L4 header.
pub enum L4 {
    /// A TCP header is there (`Packet::tcp` is set).
    Tcp,
    /// ICMP.
    Icmp,
    /// A later fragment: no L4 header.
    LaterFragment,
    /// Another protocol.
    Other,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<(Packet, L4), NotOurs> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(NotOurs::Truncated)?;
    let mut proto = unsafe { (*eth).proto };
    let mut l3 = ETH_LEN;
    let mut vlan: *mut VlanHdr = core::ptr::null_mut();
    if proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE {
        vlan = ptr_at(ctx, ETH_LEN).ok_or(NotOurs::Truncated)?;
        proto = unsafe { (*vlan).proto };
        l3 += VLAN_LEN;
    }
    if proto != ETH_P_IP_BE {
        return Err(NotOurs::NotIpv4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(NotOurs::Truncated)?;
    let version_ihl = unsafe { (*ip).version_ihl };
    if version_ihl >> 4 != 4 {
        return Err(NotOurs::NotIpv4);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(NotOurs::Truncated);
    }
    // A packet longer than its frame (or shorter than its header) is malformed: whatever
    // lb did with it, the next hop would drop it.
    let tot_len = u16::from_be(unsafe { (*ip).tot_len }) as usize;
    if tot_len < ihl || ip as usize + tot_len > ctx.data_end() {
        return Err(NotOurs::Truncated);
    }
    let frag = u16::from_be(unsafe { (*ip).frag_off });
    let mut pkt = Packet {
        eth,
        vlan,
        ip,
        l4: l3 + ihl,
        tcp: core::ptr::null_mut(),
        has_options: ihl > size_of::<Ipv4Hdr>(),
        fragment: frag & 0x2000 != 0,
    };
    if frag & 0x1fff != 0 {
        return Ok((pkt, L4::LaterFragment));
    }
    let l4 = match unsafe { (*ip).proto } {
        lb_common::IPPROTO_TCP => {
            pkt.tcp = ptr_at(ctx, pkt.l4).ok_or(NotOurs::Truncated)?;
            L4::Tcp
        }
        IPPROTO_ICMP => L4::Icmp,
        _ => L4::Other,
    };
    Ok((pkt, l4))
}

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;

impl Packet {
    /// The frame carries a VLAN tag.
    #[inline(always)]
    pub fn tagged(&self) -> bool {
        !self.vlan.is_null()
    }
}

/// TCP option kinds and lengths lb looks for (RFC 9293, RFC 7323).
pub const TCPOPT_MSS: u8 = 2;
pub const TCPOLEN_MSS: u8 = 4;
pub const TCPOPT_TS: u8 = 8;
pub const TCPOLEN_TS: u8 = 10;

/// Offset from the TCP header of the TSval of the packet's timestamp option, if any.
///
/// Linux puts NOP, NOP, TS first on every segment after the handshake: that case is one
/// comparison. Anything else (SYNs, other stacks) walks the options.
#[inline(always)]
pub fn tcp_ts(ctx: &XdpContext, pkt: &Packet) -> Option<usize> {
    let tcp = pkt.tcp as usize;
    let end = ctx.data_end();
    let doff = ((unsafe { (*pkt.tcp).doff_res } >> 4) as usize) * 4;
    if doff <= size_of::<TcpHdr>() {
        return None;
    }
    let opts = size_of::<TcpHdr>();
    if tcp + opts + 12 <= end && opts + 12 <= doff {
        let first = unsafe { *((tcp + opts) as *const [u8; 4]) };
        if first == [1, 1, TCPOPT_TS, TCPOLEN_TS] {
            return Some(opts + 4);
        }
    }
    tcp_option(tcp, end, doff, TCPOPT_TS, TCPOLEN_TS)
}

/// Offset from the TCP header of the 16-bit value of the packet's MSS option, if any (a
/// SYN's or a SYN-ACK's; Linux puts it first, which the walk meets at once).
#[inline(always)]
pub fn tcp_mss(ctx: &XdpContext, pkt: &Packet) -> Option<usize> {
    let doff = ((unsafe { (*pkt.tcp).doff_res } >> 4) as usize) * 4;
    if doff <= size_of::<TcpHdr>() {
        return None;
    }
    tcp_option(
        pkt.tcp as usize,
        ctx.data_end(),
        doff,
        TCPOPT_MSS,
        TCPOLEN_MSS,
    )
}

/// Offset from the TCP header (at `tcp`; the packet ends at `end`) of the data of the first
/// option `kind` whose length is `len` and which ends inside the header (`doff` bytes): a
/// walk of at most 40 steps (40 bytes of options, each step at least one byte).
///
/// Every offset is checked against the header length before it is used; the mask after the
/// check only tells the verifier what the check already proved. The found option's end is
/// checked once, after its kind and length matched: a check on every option (what LLVM
/// made of it as a match guard) doubles the states the verifier explores at each step, and
/// the program went past the verifier's million instructions.
#[inline(always)]
fn tcp_option(tcp: usize, end: usize, doff: usize, kind: u8, len: u8) -> Option<usize> {
    let mut at = size_of::<TcpHdr>();
    for _ in 0..40 {
        // doff <= 60, so an offset that passes this check is below 64 and the mask is a no-op.
        if at + 2 > doff {
            return None;
        }
        let a = at & 63;
        if tcp + a + 2 > end {
            return None;
        }
        let [k, l] = unsafe { *((tcp + a) as *const [u8; 2]) };
        match k {
            0 => return None,
            1 => at = a + 1,
            // One running past the header is not an option, and nothing follows it.
            _ if k == kind && l == len => {
                return (a + len as usize <= doff).then_some(a + 2);
            }
            _ if l < 2 => return None,
            _ => at = a + l as usize,
        }
    }
    None
}
