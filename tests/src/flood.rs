//! A bounded flooder for the lab: spoofed SYNs or stray ACKs to the VIP, crafted as whole
//! Ethernet frames from one template and sent in sendmmsg batches on an AF_PACKET socket.
//! It refuses anything outside the lab's addresses and any count or time beyond its caps.

use std::{
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::packet::TcpFlags;

/// The lab's range, 198.18.0.0/15: every address a flood names must be in it.
pub const LAB_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// Where spoofed SYNs come from: the half of the lab range no lab host uses.
pub const SPOOF_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Most packets one run may send.
pub const MAX_PACKETS: u64 = 5_000_000;
/// Longest run.
pub const MAX_DURATION: Duration = Duration::from_secs(60);
/// Frames per sendmmsg call.
pub const BATCH: usize = 64;
/// Ethernet + IPv4 + TCP headers, no options, no payload.
pub const FRAME_LEN: usize = 14 + 20 + 20;

const IP: usize = 14;
const TCP: usize = IP + 20;
const TTL: u8 = 64;

/// What the flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SYNs from random addresses of SPOOF_NET and random ports.
    Syn,
    /// Bare ACKs from the given source address, random ports, random seq and ack numbers.
    Ack,
}

/// One flood.
#[derive(Debug, Clone)]
pub struct Options {
    /// SYNs or ACKs.
    pub mode: Mode,
    /// The sending interface's MAC.
    pub src_mac: [u8; 6],
    /// The LB's MAC: the frames skip ARP, as a flooder on the LB's segment would.
    pub dst_mac: [u8; 6],
    /// Source address of ACKs (SYNs are spoofed from SPOOF_NET).
    pub src: Option<Ipv4Addr>,
    /// Destination address, in LAB_NET.
    pub vip: Ipv4Addr,
    /// Destination port.
    pub port: u16,
    /// Packets per second.
    pub rate: u64,
    /// How long to flood, at most MAX_DURATION.
    pub duration: Duration,
    /// Stop after this many packets even if time remains.
    pub max_packets: u64,
}

/// True when `addr` is in `net`.
pub fn in_net(addr: Ipv4Addr, net: (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(net.1)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net.0) & mask
}

impl Options {
    /// Refuses floods that would leave the lab or are not bounded.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            in_net(self.vip, LAB_NET),
            "destination {} is outside the lab range 198.18.0.0/15",
            self.vip
        );
        match (self.mode, self.src) {
            (Mode::Ack, None) => bail!("an ACK flood needs --src (the client's own address)"),
            (Mode::Ack, Some(src)) => ensure!(
                in_net(src, LAB_NET),
                "source {src} is outside the lab range 198.18.0.0/15"
            ),
            (Mode::Syn, Some(_)) => bail!("SYNs are spoofed from 198.19.0.0/16: no --src"),
            (Mode::Syn, None) => {}
        }
        ensure!(self.port != 0, "destination port 0");
        ensure!(self.rate > 0, "--rate must be positive");
        ensure!(
            self.max_packets > 0 && self.max_packets <= MAX_PACKETS,
            "--max-packets must be 1..={MAX_PACKETS}, got {}",
            self.max_packets
        );
        ensure!(
            !self.duration.is_zero() && self.duration <= MAX_DURATION,
            "--duration must be 1..={} s, got {:?}",
            MAX_DURATION.as_secs(),
            self.duration
        );
        ensure!(
            self.dst_mac[0] & 1 == 0,
            "--dst-mac must be a unicast address (the LB's), not a group address"
        );
        Ok(())
    }
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    ensure!(parts.len() == 6, "MAC address {s:?}: want six hex octets");
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// xorshift64*: fast enough to draw several fields per frame at line rate, and the flood
/// needs spread, not unpredictability.
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One's-complement sum of big-endian 16-bit words.
fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn word_sum(v: u32) -> u32 {
    (v >> 16) + (v & 0xffff)
}

/// Builds flood frames from one template: per frame only the random fields are written and
/// both checksums are the template's constant part plus those fields.
pub struct Crafter {
    mode: Mode,
    /// The ACKs' source address; SYNs draw theirs per frame.
    ack_src: u32,
    template: [u8; FRAME_LEN],
    /// Sum of the IP header's words that never change (checksum field zero).
    ip_base: u32,
    /// Sum of the pseudo-header's and TCP header's words that never change.
    tcp_base: u32,
    rng: Rng,
}

impl Crafter {
    /// A crafter for `o`'s flood; `seed` starts the random fields.
    pub fn new(o: &Options, seed: u64) -> Self {
        let mut t = [0u8; FRAME_LEN];
        t[0..6].copy_from_slice(&o.dst_mac);
        t[6..12].copy_from_slice(&o.src_mac);
        t[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut t[IP..TCP];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // DF, as Linux sends TCP
        ip[8] = TTL;
        ip[9] = 6;
        ip[16..20].copy_from_slice(&o.vip.octets());
        let (flags, window) = match o.mode {
            Mode::Syn => (TcpFlags::SYN, 64240u16),
            Mode::Ack => (TcpFlags::ACK, 502),
        };
        let tcp = &mut t[TCP..];
        tcp[2..4].copy_from_slice(&o.port.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&window.to_be_bytes());
        // The source address (zero in the template) is written and summed per frame: SYNs
        // draw theirs, and one path for both modes is simpler than two.
        let pseudo = word_sum(u32::from(o.vip)) + 6 + 20;
        Self {
            mode: o.mode,
            ack_src: o.src.map_or(0, u32::from),
            template: t,
            ip_base: sum_words(&t[IP..TCP]),
            tcp_base: pseudo + sum_words(&t[TCP..]),
            rng: Rng::new(seed),
        }
    }

    /// Writes the next frame into `f`.
    pub fn fill(&mut self, f: &mut [u8; FRAME_LEN]) {
        *f = self.template;
        let r = self.rng.next_u64();
        let src = match self.mode {
            // Host part 1..=65534: neither the network nor the broadcast address.
            Mode::Syn => u32::from(SPOOF_NET.0) + 1 + (r % 65534) as u32,
            Mode::Ack => self.ack_src,
        };
        let id = (r >> 16) as u16;
        let sport = 1024 + ((r >> 32) % (65536 - 1024)) as u16;
        let r2 = self.rng.next_u64();
        let seq = r2 as u32;
        let ack = match self.mode {
            Mode::Syn => 0,
            Mode::Ack => (r2 >> 32) as u32,
        };
        f[IP + 4..IP + 6].copy_from_slice(&id.to_be_bytes());
        f[IP + 12..IP + 16].copy_from_slice(&src.to_be_bytes());
        let ip_sum = self.ip_base + u32::from(id) + word_sum(src);
        f[IP + 10..IP + 12].copy_from_slice(&fold(ip_sum).to_be_bytes());
        f[TCP..TCP + 2].copy_from_slice(&sport.to_be_bytes());
        f[TCP + 4..TCP + 8].copy_from_slice(&seq.to_be_bytes());
        f[TCP + 8..TCP + 12].copy_from_slice(&ack.to_be_bytes());
        let tcp_sum =
            self.tcp_base + word_sum(src) + u32::from(sport) + word_sum(seq) + word_sum(ack);
        f[TCP + 16..TCP + 18].copy_from_slice(&fold(tcp_sum).to_be_bytes());
    }
}

/// Paces sends: tokens accrue at `rate` per second up to `burst`; a batch goes when the
/// bucket holds enough for it.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// An empty bucket: a run starts without a burst that would flatter its average.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            tokens: 0.0,
            last: now,
        }
    }

    /// Takes `n` tokens, or says how long until there are enough.
    pub fn take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            // Rounded up: a wait that rounds to zero would spin without earning anything.
            Err(Duration::from_nanos(
                ((n - self.tokens) * 1e9 / self.rate).ceil() as u64,
            ))
        }
    }
}

/// An AF_PACKET socket that sends whole Ethernet frames out of one interface.
pub struct Sender {
    fd: OwnedFd,
    to: libc::sockaddr_ll,
}

impl Sender {
    /// Opens the socket for `interface`; frames go to `dst_mac`.
    pub fn open(interface: &str, dst_mac: [u8; 6]) -> Result<Self> {
        let name = std::ffi::CString::new(interface).context("interface name")?;
        // SAFETY: a NUL-terminated name; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("interface {interface}"));
        }
        // Protocol 0: the socket receives nothing, so nothing queues up while we flood.
        let fd = lb_agent::sock::socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
            .context("AF_PACKET socket (needs CAP_NET_RAW)")?;
        // The qdisc adds nothing here (veth has none) but costs time per frame.
        let one: libc::c_int = 1;
        // SAFETY: an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        let to = lb_agent::sock::packet_addr(ifindex, Some(dst_mac));
        Ok(Self { fd, to })
    }

    /// Sends `frames` in one sendmmsg call; returns how many the kernel took.
    pub fn send(&self, frames: &[[u8; FRAME_LEN]]) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: msghdr is plain data; all-zero is a valid value.
                let mut h: libc::msghdr = unsafe { mem::zeroed() };
                h.msg_name = (&self.to as *const libc::sockaddr_ll).cast_mut().cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                h.msg_iov = v;
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: every header points at live buffers (frames, iov, self.to) that outlive
        // the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// What a flood did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was sent.
    pub mode: Mode,
    /// Frames the kernel accepted.
    pub sent: u64,
    /// Frames the kernel did not take (device backlog full): not in `sent`.
    pub refused: u64,
    /// From the start to the end of the run.
    pub seconds: f64,
    /// Achieved packets per second: sent / seconds.
    pub rate: f64,
    /// The rate asked for.
    pub target_rate: u64,
}

/// Runs the flood `o` through `sender` until its duration or packet cap is reached.
pub fn run(o: &Options, sender: &Sender, seed: u64) -> Result<Report> {
    o.validate()?;
    let mut crafter = Crafter::new(o, seed);
    let mut frames = vec![[0u8; FRAME_LEN]; BATCH];
    let start = Instant::now();
    let deadline = start + o.duration;
    // 100 ms of credit makes up for the sender being preempted on a busy host (the frames'
    // softirq work runs on its CPU too) while no second sees much more than the rate.
    let mut bucket = TokenBucket::new(o.rate, (o.rate / 10).max(BATCH as u64), start);
    let (mut sent, mut refused) = (0u64, 0u64);
    loop {
        let now = Instant::now();
        if now >= deadline || sent + refused >= o.max_packets {
            break;
        }
        let n = (o.max_packets - sent - refused).min(BATCH as u64) as usize;
        if let Err(wait) = bucket.take(n as u64, now) {
            std::thread::sleep(wait.min(deadline - now));
            continue;
        }
        for f in &mut frames[..n] {
            crafter.fill(f);
        }
        match sender.send(&frames[..n]) {
            Ok(k) => {
                sent += k as u64;
                refused += (n - k) as u64;
            }
            // The receiving side's backlog is full: those frames are lost, as on a wire.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => refused += n as u64,
            Err(e) => return Err(e).context("sendmmsg"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Report {
        mode: o.mode,
        sent,
        refused,
        seconds,
        rate: sent as f64 / seconds,
        target_rate: o.rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet;

    fn opts(mode: Mode) -> Options {
        Options {
            mode,
            src_mac: [2, 0, 0xc6, 0x12, 0, 50],
            dst_mac: [2, 0, 0xc6, 0x12, 0, 2],
            src: (mode == Mode::Ack).then_some(Ipv4Addr::new(198, 18, 0, 50)),
            vip: Ipv4Addr::new(198, 18, 0, 100),
            port: 6443,
            rate: 50_000,
            duration: Duration::from_secs(5),
            max_packets: 250_000,
        }
    }

    #[test]
    fn syn_frames_are_valid_spoofed_from_198_19_and_varied() {
        let o = opts(Mode::Syn);
        let mut c = Crafter::new(&o, 42);
        let mut f = [0u8; FRAME_LEN];
        let mut sources = std::collections::HashSet::new();
        let mut ports = std::collections::HashSet::new();
        for _ in 0..10_000 {
            c.fill(&mut f);
            let p = packet::parse(&f).expect("an IPv4/TCP frame");
            assert!(p.ip_csum_ok && p.tcp_csum_ok, "checksums of {f:02x?}");
            assert!(in_net(p.src, SPOOF_NET), "source {}", p.src);
            assert!(!p.src.octets()[2..].iter().all(|&b| b == 0 || b == 255));
            assert_eq!((p.dst, p.dport), (o.vip, o.port));
            assert!(p.sport >= 1024);
            assert_eq!(p.flags, TcpFlags::SYN);
            assert_eq!((p.eth_dst, p.eth_src), (o.dst_mac, o.src_mac));
            assert_eq!(
                u32::from_be_bytes(f[TCP + 8..TCP + 12].try_into().unwrap()),
                0
            );
            sources.insert(p.src);
            ports.insert(p.sport);
        }
        assert!(sources.len() > 9_000, "{} distinct sources", sources.len());
        assert!(ports.len() > 9_000, "{} distinct ports", ports.len());
    }

    #[test]
    fn ack_frames_are_valid_from_the_given_source() {
        let o = opts(Mode::Ack);
        let mut c = Crafter::new(&o, 7);
        let mut f = [0u8; FRAME_LEN];
        let mut acks = std::collections::HashSet::new();
        for _ in 0..10_000 {
            c.fill(&mut f);
            let p = packet::parse(&f).expect("an IPv4/TCP frame");
            assert!(p.ip_csum_ok && p.tcp_csum_ok, "checksums of {f:02x?}");
            assert_eq!(Some(p.src), o.src);
            assert_eq!(p.flags, TcpFlags::ACK);
            acks.insert(u32::from_be_bytes(f[TCP + 8..TCP + 12].try_into().unwrap()));
        }
        assert!(acks.len() > 9_000, "ack numbers vary");
    }

    #[test]
    fn refuses_floods_outside_the_lab_or_unbounded() {
        assert!(opts(Mode::Syn).validate().is_ok());
        assert!(opts(Mode::Ack).validate().is_ok());
        let bad = |f: fn(&mut Options)| {
            let mut o = opts(Mode::Ack);
            f(&mut o);
            o.validate().unwrap_err().to_string()
        };
        assert!(bad(|o| o.vip = Ipv4Addr::new(10, 0, 0, 1)).contains("outside the lab"));
        assert!(bad(|o| o.vip = Ipv4Addr::new(198, 20, 0, 1)).contains("outside the lab"));
        assert!(bad(|o| o.vip = Ipv4Addr::new(198, 17, 255, 255)).contains("outside the lab"));
        assert!(bad(|o| o.src = Some(Ipv4Addr::new(8, 8, 8, 8))).contains("outside the lab"));
        assert!(bad(|o| o.src = None).contains("--src"));
        assert!(bad(|o| o.max_packets = MAX_PACKETS + 1).contains("--max-packets"));
        assert!(bad(|o| o.max_packets = 0).contains("--max-packets"));
        assert!(bad(|o| o.duration = Duration::from_secs(61)).contains("--duration"));
        assert!(bad(|o| o.rate = 0).contains("--rate"));
        assert!(bad(|o| o.dst_mac = [0xff; 6]).contains("unicast"));
        let mut o = opts(Mode::Syn);
        o.src = Some(Ipv4Addr::new(198, 18, 0, 50));
        assert!(o.validate().is_err(), "SYN sources are always spoofed");
        assert!(in_net(Ipv4Addr::new(198, 19, 255, 255), LAB_NET));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:c6:12:00:02\n").unwrap(),
            [2, 0, 0xc6, 0x12, 0, 2]
        );
        assert!(parse_mac("02:00:c6:12:00").is_err());
        assert!(parse_mac("02:00:c6:12:00:zz").is_err());
    }

    #[test]
    fn token_bucket_keeps_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 64, t0);
        let wait = b.take(64, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(64), "starts empty");
        assert!(b.take(64, t0 + wait).is_ok());
        // A long pause earns no more than the burst.
        let t1 = t0 + Duration::from_secs(10);
        assert!(b.take(64, t1).is_ok());
        assert!(b.take(1, t1).is_err());
        // Over a simulated second of batches the count is the rate, give or take one batch.
        let (mut now, mut sent) = (t1, 0u64);
        let end = t1 + Duration::from_secs(1);
        while now < end {
            match b.take(64, now) {
                Ok(()) => sent += 64,
                Err(w) => now += w,
            }
        }
        assert!((936..=1064).contains(&sent), "{sent} in 1 s at 1000/s");
    }
}
