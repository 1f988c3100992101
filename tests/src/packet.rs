//! Crafting and checking Ethernet/IPv4/TCP frames; checksums computed from scratch.

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
