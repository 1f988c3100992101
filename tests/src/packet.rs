//! Crafting and checking Ethernet/IPv4/TCP frames, and ICMPv4 errors about them (see
//! [`IcmpError`] and [`parse_icmp`]); checksums computed from scratch.

use std::net::Ipv4Addr;

/// TCP flag bits.
pub struct TcpFlags;
impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The Internet checksum of `data` added to `init`.
pub fn checksum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += w as u32;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u16::from_be_bytes([s[0], s[1]]) as u32
        + u16::from_be_bytes([s[2], s[3]]) as u32
        + u16::from_be_bytes([d[0], d[1]]) as u32
        + u16::from_be_bytes([d[2], d[3]]) as u32
        + 6
        + len as u32
}

/// A TCP segment in an IPv4 packet in an Ethernet frame.
#[derive(Clone)]
pub struct Frame {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
    payload: Vec<u8>,
    vlan: Option<u16>,
    options: Vec<u8>,
    tcp_options: Vec<u8>,
    more_fragments: bool,
    seq: u32,
}

impl Frame {
    pub fn tcp(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        flags: u8,
    ) -> Self {
        Self {
            src_mac,
            dst_mac,
            src,
            sport,
            dst,
            dport,
            flags,
            payload: Vec::new(),
            vlan: None,
            options: Vec::new(),
            tcp_options: Vec::new(),
            more_fragments: false,
            seq: 0x1234_5678,
        }
    }
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }
    pub fn ip_options(mut self, o: &[u8]) -> Self {
        assert_eq!(o.len() % 4, 0);
        self.options = o.to_vec();
        self
    }
    /// Raw TCP options (padded with NOPs to a multiple of 4).
    pub fn tcp_options(mut self, o: &[u8]) -> Self {
        let mut o = o.to_vec();
        while !o.len().is_multiple_of(4) {
            o.push(1);
        }
        self.tcp_options = o;
        self
    }
    /// A timestamp option laid out as Linux does: after MSS and SACK-permitted on a SYN,
    /// behind two NOPs otherwise.
    pub fn timestamps(self, tsval: u32, tsecr: u32) -> Self {
        let mut o = Vec::new();
        if self.flags & TcpFlags::SYN != 0 {
            o.extend_from_slice(&[2, 4, 0x05, 0xb4, 4, 2]);
        } else {
            o.extend_from_slice(&[1, 1]);
        }
        o.extend_from_slice(&[8, 10]);
        o.extend_from_slice(&tsval.to_be_bytes());
        o.extend_from_slice(&tsecr.to_be_bytes());
        if self.flags & TcpFlags::SYN != 0 {
            o.extend_from_slice(&[1, 3, 3, 7]);
        }
        self.tcp_options(&o)
    }
    /// An MSS option alone (a SYN as the simplest stacks send it).
    pub fn mss(self, mss: u16) -> Self {
        self.tcp_options(&mss_option(mss))
    }
    pub fn more_fragments(mut self) -> Self {
        self.more_fragments = true;
        self
    }

    /// Sets the sequence number (default 0x12345678).
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// A later fragment (offset 185 x 8 bytes) carrying this frame's TCP bytes as payload.
    pub fn later_fragment(&self) -> Vec<u8> {
        let mut f = self.bytes();
        let ip = 14 + if self.vlan.is_some() { 4 } else { 0 };
        f[ip + 6] = 0x00;
        f[ip + 7] = 185;
        f[ip + 10] = 0;
        f[ip + 11] = 0;
        let hl = (f[ip] & 0x0f) as usize * 4;
        let c = checksum(&f[ip..ip + hl], 0);
        f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// The IPv4 packet alone (what an ICMP error quotes).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let f = self.bytes();
        f[if self.vlan.is_some() { 18 } else { 14 }..].to_vec()
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(
            &(if self.flags & TcpFlags::ACK != 0 {
                0x0abc_def0u32
            } else {
                0
            })
            .to_be_bytes(),
        );
        tcp.push((((20 + self.tcp_options.len()) / 4) << 4) as u8);
        tcp.push(self.flags);
        tcp.extend_from_slice(&64240u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(&self.tcp_options);
        tcp.extend_from_slice(&self.payload);
        let c = checksum(&tcp, pseudo(self.src, self.dst, tcp.len()));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());

        let ihl = 5 + self.options.len() / 4;
        let total = ihl * 4 + tcp.len();
        let mut ip = vec![
            (4 << 4) | ihl as u8,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            if self.more_fragments { 0x20 } else { 0x40 },
            0,
            64,
            6,
            0,
            0,
        ];
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        f
    }
}

/// What a test checks in a frame the program sent.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<u16>,
    pub ihl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// IP total length.
    pub ip_len: usize,
    pub ip_csum_ok: bool,
    pub tcp_csum_ok: bool,
    /// The timestamp option's (TSval, TSecr), if any.
    pub timestamps: Option<(u32, u32)>,
    /// The MSS option's value, if any (see [`mss`]).
    pub mss: Option<u16>,
    /// The TCP options as they are.
    pub tcp_options: Vec<u8>,
}

/// The 4 bytes of an MSS option.
pub fn mss_option(mss: u16) -> [u8; 4] {
    let m = mss.to_be_bytes();
    [2, 4, m[0], m[1]]
}

/// The MSS option's value in a TCP header, walking the options as RFC 9293 says and as
/// lb's data plane does: the walk ends at End of Option List or at an option whose length
/// is below 2, and an MSS option counts only with length 4, inside the header.
pub fn mss(tcp: &[u8]) -> Option<u16> {
    let doff = ((*tcp.get(12)? >> 4) as usize * 4).min(tcp.len());
    let mut i = 20;
    while i + 2 <= doff {
        let (kind, len) = (tcp[i], tcp[i + 1] as usize);
        match kind {
            0 => return None,
            1 => i += 1,
            2 if len == 4 && i + 4 <= doff => {
                return Some(u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]))
            }
            _ if len < 2 => return None,
            _ => i += len,
        }
    }
    None
}

/// Finds the timestamp option in a TCP header.
fn timestamps(tcp: &[u8]) -> Option<(u32, u32)> {
    let doff = (tcp[12] >> 4) as usize * 4;
    let mut i = 20;
    while i < doff.min(tcp.len()) {
        match tcp[i] {
            0 => return None,
            1 => i += 1,
            8 => {
                let v = u32::from_be_bytes(tcp[i + 2..i + 6].try_into().ok()?);
                let e = u32::from_be_bytes(tcp[i + 6..i + 10].try_into().ok()?);
                return Some((v, e));
            }
            _ => i += (*tcp.get(i + 1)? as usize).max(2),
        }
    }
    None
}

pub fn parse(f: &[u8]) -> Option<Parsed> {
    let mut off = 14;
    let mut proto = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let mut vlan = None;
    if proto == 0x8100 {
        vlan = Some(u16::from_be_bytes([f[14], f[15]]) & 0x0fff);
        proto = u16::from_be_bytes([f[16], f[17]]);
        off += 4;
    }
    if proto != 0x0800 {
        return None;
    }
    let ip = f.get(off..)?;
    let ihl = ip[0] & 0x0f;
    let hl = ihl as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(hl..total)?;
    Some(Parsed {
        eth_dst: f[0..6].try_into().ok()?,
        eth_src: f[6..12].try_into().ok()?,
        vlan,
        ihl,
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        flags: tcp[13],
        seq: u32::from_be_bytes(tcp[4..8].try_into().ok()?),
        ack: u32::from_be_bytes(tcp[8..12].try_into().ok()?),
        ip_len: total,
        ip_csum_ok: checksum(&ip[..hl], 0) == 0,
        tcp_csum_ok: checksum(tcp, pseudo(src, dst, tcp.len())) == 0,
        timestamps: timestamps(tcp),
        mss: mss(tcp),
        tcp_options: tcp
            .get(20..((tcp[12] >> 4) as usize * 4).min(tcp.len()))
            .unwrap_or_default()
            .to_vec(),
    })
}

pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

pub fn ipv6_frame(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8].repeat(8));
    f.extend_from_slice(&[0u8; 20]);
    f
}

pub fn icmp_echo(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN's ctx_in.
pub fn xdp_md(len: u32, ingress_ifindex: u32) -> Vec<u8> {
    [0u32, len, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// Runs `prog` once on `frame` arriving on `ifindex` (BPF_PROG_TEST_RUN, in the calling
/// thread's namespace); returns the verdict and the frame as it left.
pub fn test_run(prog: &aya::programs::Xdp, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    let ctx = xdp_md(frame.len() as u32, ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// ICMPv4 error kinds (RFC 792, RFC 1191).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Destination unreachable, fragmentation needed and DF set (type 3 code 4), with the
    /// next-hop MTU.
    FragNeeded { mtu: u16 },
    /// Destination unreachable, host unreachable (type 3 code 1).
    HostUnreachable,
    /// Time exceeded, TTL exceeded in transit (type 11 code 0).
    TimeExceeded,
    /// Any other type and code; the rest-of-header word is zero.
    Other { icmp_type: u8, code: u8 },
}

impl IcmpKind {
    /// ICMP type and code.
    pub fn type_code(self) -> (u8, u8) {
        match self {
            Self::FragNeeded { .. } => (3, 4),
            Self::HostUnreachable => (3, 1),
            Self::TimeExceeded => (11, 0),
            Self::Other { icmp_type, code } => (icmp_type, code),
        }
    }

    /// The 4 bytes after type, code and checksum: unused, or the next-hop MTU.
    fn rest(self) -> [u8; 4] {
        match self {
            Self::FragNeeded { mtu } => {
                let m = mtu.to_be_bytes();
                [0, 0, m[0], m[1]]
            }
            _ => [0; 4],
        }
    }
}

/// How much of the offending packet an ICMP error quotes, after its IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quote {
    /// 8 bytes: the ports and the sequence number (RFC 792's minimum).
    Min8,
    /// The whole TCP header, options included.
    TcpHeader,
    /// As Linux does: as much as fits in a 576-byte ICMP datagram.
    Linux,
    /// `n` bytes (at most what there is).
    Bytes(usize),
}

/// An ICMPv4 error in an Ethernet frame, quoting (part of) the IPv4 packet of a [`Frame`]:
/// what a router sends back about a packet it could not forward.
///
/// ```
/// # use lb_tests::packet::*;
/// # use std::net::Ipv4Addr;
/// let reply = Frame::tcp([2; 6], [4; 6], Ipv4Addr::new(198, 18, 0, 100), 6443,
///                        Ipv4Addr::new(198, 19, 1, 2), 40000, TcpFlags::ACK)
///     .payload(&[0; 1448]).timestamps(1, 2);
/// let icmp = IcmpError::new([6; 6], [2; 6], Ipv4Addr::new(198, 18, 0, 254),
///                           Ipv4Addr::new(198, 18, 0, 100), IcmpKind::FragNeeded { mtu: 1280 },
///                           &reply).bytes();
/// let p = parse_icmp(&icmp).unwrap();
/// assert!(p.ip_csum_ok && p.icmp_csum_ok && p.inner.ip_csum_ok);
/// assert_eq!((p.mtu, p.inner.dport), (Some(1280), 40000));
/// ```
#[derive(Clone)]
pub struct IcmpError {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: IcmpKind,
    original: Vec<u8>,
    quote: Quote,
    vlan: Option<u16>,
}

impl IcmpError {
    /// From `src` (the reporting router) to `dst` (the offending packet's source, normally),
    /// about `about`; quotes the whole TCP header by default.
    pub fn new(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: IcmpKind,
        about: &Frame,
    ) -> Self {
        Self::about_ip(src_mac, dst_mac, src, dst, kind, &about.ip_bytes())
    }

    /// Like `new`, about raw IPv4 packet bytes (e.g. a frame the program sent, minus its
    /// Ethernet header).
    pub fn about_ip(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: IcmpKind,
        ip_packet: &[u8],
    ) -> Self {
        Self {
            src_mac,
            dst_mac,
            src,
            dst,
            kind,
            original: ip_packet.to_vec(),
            quote: Quote::TcpHeader,
            vlan: None,
        }
    }

    pub fn quote(mut self, q: Quote) -> Self {
        self.quote = q;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// The quoted bytes: the original IP header and as much of what follows as `quote` says.
    pub fn quoted(&self) -> &[u8] {
        let o = &self.original;
        let hl = (o[0] & 0x0f) as usize * 4;
        let l4 = match self.quote {
            Quote::Min8 => 8,
            Quote::TcpHeader => o.get(hl + 12).map_or(20, |d| (d >> 4) as usize * 4),
            Quote::Linux => 576 - 20 - 8 - hl,
            Quote::Bytes(n) => n,
        };
        &o[..(hl + l4).min(o.len())]
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = self.dst_mac.to_vec();
        f.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let (t, c) = self.kind.type_code();
        let mut icmp = vec![t, c, 0, 0];
        icmp.extend_from_slice(&self.kind.rest());
        icmp.extend_from_slice(self.quoted());
        let sum = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let total = 20 + icmp.len();
        // As Linux sends errors: precedence "internetwork control", no DF.
        let mut ip = vec![
            0x45,
            0xc0,
            (total >> 8) as u8,
            total as u8,
            0x56,
            0x78,
            0,
            0,
            64,
            1,
            0,
            0,
        ];
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let sum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&icmp);
        f
    }
}

/// The packet an ICMP error quotes, as far as the quote goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerPacket {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Its total length as its header says (not what was quoted).
    pub tot_len: u16,
    pub ttl: u8,
    pub ip_csum_ok: bool,
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number, when the quote reaches it.
    pub seq: Option<u32>,
    /// The TCP checksum field, when the quote reaches it.
    pub tcp_check: Option<u16>,
    /// Whether the TCP checksum is right, when the whole segment is quoted.
    pub tcp_csum_ok: Option<bool>,
    /// Bytes quoted after its IP header.
    pub l4_quoted: usize,
}

/// What a test checks in an ICMP error frame.
#[derive(Debug, Clone)]
pub struct ParsedIcmp {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub icmp_type: u8,
    pub code: u8,
    /// The next-hop MTU of a fragmentation-needed error (type 3 code 4).
    pub mtu: Option<u16>,
    /// The outer IP header's checksum.
    pub ip_csum_ok: bool,
    /// The ICMP checksum, over the ICMP header and everything quoted.
    pub icmp_csum_ok: bool,
    pub inner: InnerPacket,
}

/// Parses an ICMPv4 error (destination unreachable, time exceeded, parameter problem) in an
/// Ethernet frame, optionally VLAN-tagged; None for anything else or when the quote does
/// not hold the inner IP header and the ports.
pub fn parse_icmp(f: &[u8]) -> Option<ParsedIcmp> {
    let mut off = 14;
    let mut proto = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let mut vlan = None;
    if proto == 0x8100 {
        vlan = Some(u16::from_be_bytes([*f.get(14)?, *f.get(15)?]) & 0x0fff);
        proto = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        off += 4;
    }
    if proto != 0x0800 {
        return None;
    }
    let ip = f.get(off..)?;
    let hl = (*ip.first()? & 0x0f) as usize * 4;
    if hl < 20 || *ip.get(9)? != 1 {
        return None;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let icmp = ip.get(hl..total)?;
    if icmp.len() < 8 || !matches!(icmp[0], 3 | 11 | 12) {
        return None;
    }
    let inner = icmp.get(8..)?;
    let ihl = (*inner.first()? & 0x0f) as usize * 4;
    if ihl < 20 {
        return None;
    }
    let inner_ip = inner.get(..ihl)?;
    let l4 = inner.get(ihl..)?;
    let (isrc, idst) = (
        Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
        Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
    );
    let iproto = inner[9];
    let tot_len = u16::from_be_bytes([inner[2], inner[3]]);
    let tcp = iproto == 6;
    let be32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
    };
    let complete = l4.len() == (tot_len as usize).saturating_sub(ihl);
    Some(ParsedIcmp {
        eth_dst: f[0..6].try_into().ok()?,
        eth_src: f[6..12].try_into().ok()?,
        vlan,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        icmp_type: icmp[0],
        code: icmp[1],
        mtu: (icmp[0] == 3 && icmp[1] == 4).then(|| u16::from_be_bytes([icmp[6], icmp[7]])),
        ip_csum_ok: checksum(&ip[..hl], 0) == 0,
        icmp_csum_ok: checksum(icmp, 0) == 0,
        inner: InnerPacket {
            src: isrc,
            dst: idst,
            proto: iproto,
            tot_len,
            ttl: inner[8],
            ip_csum_ok: checksum(inner_ip, 0) == 0,
            sport: u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
            dport: u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
            seq: if tcp { be32(l4, 4) } else { None },
            tcp_check: if tcp && l4.len() >= 18 {
                Some(u16::from_be_bytes([l4[16], l4[17]]))
            } else {
                None
            },
            tcp_csum_ok: (tcp && complete).then(|| checksum(l4, pseudo(isrc, idst, l4.len())) == 0),
            l4_quoted: l4.len(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 0xfe];
    const LB_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 0x02];
    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);

    /// A full-size reply segment from the VIP to a client, as a backend's TCP sends it.
    fn big_reply() -> Frame {
        Frame::tcp(LB_MAC, ROUTER_MAC, VIP, 6443, CLIENT, 40000, TcpFlags::ACK)
            .payload(&[0xab; 1448])
            .timestamps(111, 222)
    }

    fn check_inner(p: &ParsedIcmp, l4_quoted: usize) {
        assert!(p.ip_csum_ok, "outer IP checksum");
        assert!(p.icmp_csum_ok, "ICMP checksum");
        let i = &p.inner;
        assert!(i.ip_csum_ok, "inner IP checksum");
        assert_eq!((i.src, i.sport, i.dst, i.dport), (VIP, 6443, CLIENT, 40000));
        assert_eq!((i.proto, i.tot_len, i.ttl), (6, 1500, 64));
        assert_eq!(i.l4_quoted, l4_quoted);
        assert_eq!(i.seq, Some(0x1234_5678));
    }

    #[test]
    fn frag_needed_quotes_the_tcp_header_with_the_next_hop_mtu() {
        let f = big_reply();
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::FragNeeded { mtu: 1280 },
            &f,
        );
        let bytes = e.bytes();
        // 14 + 20 (IP) + 8 (ICMP) + 20 (inner IP) + 32 (TCP with timestamps).
        assert_eq!(bytes.len(), 14 + 20 + 8 + 20 + 32);
        let p = parse_icmp(&bytes).expect("parses");
        assert_eq!((p.eth_dst, p.eth_src, p.vlan), (LB_MAC, ROUTER_MAC, None));
        assert_eq!((p.src, p.dst), (ROUTER, VIP));
        assert_eq!((p.icmp_type, p.code, p.mtu), (3, 4, Some(1280)));
        check_inner(&p, 32);
        let tcp_check = u16::from_be_bytes(f.ip_bytes()[36..38].try_into().unwrap());
        assert_eq!(p.inner.tcp_check, Some(tcp_check));
        assert_eq!(
            p.inner.tcp_csum_ok, None,
            "a partial segment cannot be checked"
        );
        // The quote is the original packet's first bytes, unchanged.
        assert_eq!(&bytes[14 + 28..], &f.ip_bytes()[..52]);
    }

    #[test]
    fn host_unreachable_with_the_rfc792_minimum() {
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::HostUnreachable,
            &big_reply(),
        )
        .quote(Quote::Min8);
        let p = parse_icmp(&e.bytes()).unwrap();
        assert_eq!((p.icmp_type, p.code, p.mtu), (3, 1, None));
        check_inner(&p, 8);
        assert_eq!(p.inner.tcp_check, None);
    }

    #[test]
    fn time_exceeded_quoting_as_linux_does_and_the_whole_of_a_small_segment() {
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::TimeExceeded,
            &big_reply(),
        )
        .quote(Quote::Linux);
        let bytes = e.bytes();
        assert_eq!(bytes.len(), 14 + 576, "Linux's 576-byte ICMP datagram");
        let p = parse_icmp(&bytes).unwrap();
        assert_eq!((p.icmp_type, p.code, p.mtu), (11, 0, None));
        check_inner(&p, 576 - 20 - 8 - 20);

        // A segment short enough to be quoted whole: its TCP checksum can be checked too.
        let small = Frame::tcp(LB_MAC, ROUTER_MAC, VIP, 6443, CLIENT, 40000, TcpFlags::ACK)
            .payload(b"hello");
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::TimeExceeded,
            &small,
        )
        .quote(Quote::Linux);
        let p = parse_icmp(&e.bytes()).unwrap();
        assert_eq!(p.inner.l4_quoted, 25);
        assert_eq!(p.inner.tcp_csum_ok, Some(true));
    }

    #[test]
    fn vlan_tags_and_other_kinds() {
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::Other {
                icmp_type: 3,
                code: 3,
            },
            &big_reply(),
        )
        .vlan(42)
        .quote(Quote::Bytes(12));
        let p = parse_icmp(&e.bytes()).unwrap();
        assert_eq!(p.vlan, Some(42));
        assert_eq!((p.icmp_type, p.code), (3, 3));
        check_inner(&p, 12);
        // An error about raw bytes is the same as one about the frame.
        let raw = IcmpError::about_ip(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::HostUnreachable,
            &big_reply().ip_bytes(),
        );
        let via_frame = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::HostUnreachable,
            &big_reply(),
        );
        assert_eq!(raw.bytes(), via_frame.bytes());
    }

    #[test]
    fn bad_checksums_are_seen() {
        let good = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::FragNeeded { mtu: 1280 },
            &big_reply(),
        )
        .bytes();
        let icmp_at = 14 + 20;
        let inner_at = icmp_at + 8;

        // A changed quoted port: the ICMP checksum no longer holds, the inner IP one does.
        let mut f = good.clone();
        f[inner_at + 20] ^= 0x01;
        let p = parse_icmp(&f).unwrap();
        assert!(!p.icmp_csum_ok && p.inner.ip_csum_ok && p.ip_csum_ok);

        // A changed inner address with the ICMP checksum made right again: only the inner
        // IP checksum is wrong (a translator that forgot it).
        let mut f = good.clone();
        f[inner_at + 19] = 99;
        f[icmp_at + 2..icmp_at + 4].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[icmp_at..], 0);
        f[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
        let p = parse_icmp(&f).unwrap();
        assert!(p.icmp_csum_ok && !p.inner.ip_csum_ok);
        assert_eq!(p.inner.dst, Ipv4Addr::new(198, 19, 1, 99));

        // The outer header.
        let mut f = good;
        f[14 + 8] = 1;
        assert!(!parse_icmp(&f).unwrap().ip_csum_ok);
    }

    #[test]
    fn mss_is_found_where_a_tcp_stack_would_find_it() {
        let syn = |opts: &[u8]| {
            Frame::tcp(LB_MAC, ROUTER_MAC, CLIENT, 40000, VIP, 6443, TcpFlags::SYN)
                .tcp_options(opts)
        };
        let p = parse(&syn(&[]).mss(1460).bytes()).unwrap();
        assert_eq!(
            (p.mss, p.tcp_options.clone()),
            (Some(1460), vec![2, 4, 5, 0xb4])
        );
        assert!(p.tcp_csum_ok);
        let linux = Frame::tcp(LB_MAC, ROUTER_MAC, CLIENT, 40000, VIP, 6443, TcpFlags::SYN)
            .timestamps(1, 0);
        assert_eq!(parse(&linux.bytes()).unwrap().mss, Some(1460));
        // Behind a NOP: at an odd offset.
        assert_eq!(
            parse(&syn(&[1, 2, 4, 0x05, 0x50]).bytes()).unwrap().mss,
            Some(1360)
        );
        assert_eq!(parse(&syn(&[]).bytes()).unwrap().mss, None);
        // After End of Option List, behind an option of length 0 or 1, with a length other
        // than 4, or running past the header: not an MSS option.
        for opts in [
            &[0, 2, 4, 5, 0xb4][..],
            &[3, 0, 2, 4, 5, 0xb4],
            &[3, 1, 2, 4, 5, 0xb4],
            &[2, 5, 5, 0xb4, 0],
            &[1, 1, 1, 1, 1, 2, 4, 5],
        ] {
            assert_eq!(parse(&syn(opts).bytes()).unwrap().mss, None, "{opts:?}");
        }
    }

    #[test]
    fn other_frames_are_not_icmp_errors() {
        assert!(parse_icmp(&big_reply().bytes()).is_none(), "TCP");
        let echo = icmp_echo(ROUTER_MAC, LB_MAC, ROUTER, VIP);
        assert!(parse_icmp(&echo).is_none(), "echo request");
        assert!(parse_icmp(&arp_request(LB_MAC, VIP, ROUTER)).is_none());
        // Truncated quotes: without the ports there is nothing to translate.
        let e = IcmpError::new(
            ROUTER_MAC,
            LB_MAC,
            ROUTER,
            VIP,
            IcmpKind::HostUnreachable,
            &big_reply(),
        )
        .quote(Quote::Bytes(2));
        assert!(parse_icmp(&e.bytes()).is_none());
        assert!(parse_icmp(&[0u8; 10]).is_none());
    }
}
