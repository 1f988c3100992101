//! VRRP advertisements on the wire, IPv4 only: VRRPv2 (RFC 3768) and VRRPv3 (RFC 5798).
//!
//! Pure byte handling: encoding, decoding with structural validation, and the checks that
//! depend on the local instance's configuration (kept apart so the agent can count each
//! rejection reason separately).

use std::net::Ipv4Addr;
use std::time::Duration;

/// IP protocol number of VRRP.
pub const VRRP_PROTO: u8 = 112;
/// The IPv4 multicast group VRRP adverts are sent to.
pub const VRRP_MCAST: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// TTL every advert is sent with (RFC 5798 §5.1.1.3); receivers of multicast adverts require it.
pub const VRRP_TTL: u8 = 255;

const HEADER_LEN: usize = 8;
const AUTH_LEN: usize = 8;
const TYPE_ADVERT: u8 = 1;
const AUTH_NONE: u8 = 0;
const AUTH_PASS: u8 = 1;
const V2_INTERVAL_MAX: u16 = 0xff;
const V3_INTERVAL_MAX: u16 = 0x0fff;
const MAX_ADDRESSES: usize = 255;
const IPV4_MIN_HEADER: usize = 20;

/// VRRP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// RFC 3768: interval in seconds, optional simple password.
    V2,
    /// RFC 5798: interval in centiseconds, no authentication.
    V3,
}

impl Version {
    /// The on-wire version number.
    pub fn number(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// Converts an advert's interval field (v2 seconds, v3 centiseconds) to a duration.
    pub fn interval_duration(self, field: u16) -> Duration {
        match self {
            Version::V2 => Duration::from_secs(u64::from(field)),
            Version::V3 => Duration::from_millis(u64::from(field) * 10),
        }
    }

    /// Converts a duration to the interval field, rounding down and clamping to what the field can carry (v2 1..=255 s, v3 1..=4095 cs).
    pub fn interval_field(self, d: Duration) -> u16 {
        // Zero would make every receiver's Master_Down_Interval zero, so the floor is one unit.
        let (units, max) = match self {
            Version::V2 => (d.as_secs(), V2_INTERVAL_MAX),
            Version::V3 => (
                u64::try_from(d.as_millis() / 10).unwrap_or(u64::MAX),
                V3_INTERVAL_MAX,
            ),
        };
        units.clamp(1, u64::from(max)) as u16
    }
}

/// A VRRP advertisement, the only VRRP message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// Protocol version the advert is (to be) encoded in.
    pub version: Version,
    /// Virtual router ID.
    pub vrid: u8,
    /// Sender's priority; 0 = master resigning, 255 = address owner.
    pub priority: u8,
    /// v2: whole seconds (advert_int); v3: centiseconds (12 bits).
    pub interval: u16,
    /// The virtual addresses (informational: receivers need not check them).
    pub addresses: Vec<Ipv4Addr>,
    /// v2 only: 8-byte simple password (auth type 1), None = auth type 0.
    pub auth_pass: Option<[u8; 8]>,
}

/// Which checksum form a packet used: v3 with the IPv4 pseudo-header (keepalived's default, RFC 5798 §5.2.8) or over the VRRP message only (all v2; v3 from some implementations, keepalived's `v3_checksum_as_v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumForm {
    /// Over the IPv4 pseudo-header (src, dst, 0, 112, length) and the message.
    PseudoHeader,
    /// Over the VRRP message only.
    Plain,
}

/// Why a packet was rejected (the agent counts them by `reason()`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed VRRP (8 bytes) or IPv4 (20 bytes) header.
    #[error("packet shorter than its fixed header")]
    TooShort,
    /// The IP version nibble is not 4.
    #[error("not an IPv4 packet (IP version {0})")]
    NotIpv4(u8),
    /// IHL below 5, or a total length shorter than the header or longer than the buffer.
    #[error("malformed IPv4 header (header or total length)")]
    BadIpHeader,
    /// VRRP version other than 2 or 3.
    #[error("unsupported VRRP version {0}")]
    BadVersion(u8),
    /// VRRP type other than 1 (advertisement).
    #[error("VRRP packet type {0} is not an advertisement")]
    BadType(u8),
    /// Payload length differs from what the address count (and v2 auth data) imply.
    #[error("VRRP length does not match the address count")]
    BadLength,
    /// Checksum fails (for v3: in both forms).
    #[error("VRRP checksum mismatch")]
    BadChecksum,
    /// Address count 0 (RFC 5798: the minimum is 1).
    #[error("advertisement carries no addresses")]
    NoAddresses,
    /// v2 auth type other than 0 (none) or 1 (simple password).
    #[error("unsupported VRRPv2 authentication type {0}")]
    BadAuthType(u8),
}

impl DecodeError {
    /// Every name `reason()` can return, so counters can be registered up front.
    pub const REASONS: [&'static str; 9] = [
        "too_short",
        "not_ipv4",
        "bad_ip_header",
        "bad_version",
        "bad_type",
        "bad_length",
        "bad_checksum",
        "no_addresses",
        "bad_auth_type",
    ];

    /// Stable snake_case name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooShort => "too_short",
            DecodeError::NotIpv4(_) => "not_ipv4",
            DecodeError::BadIpHeader => "bad_ip_header",
            DecodeError::BadVersion(_) => "bad_version",
            DecodeError::BadType(_) => "bad_type",
            DecodeError::BadLength => "bad_length",
            DecodeError::BadChecksum => "bad_checksum",
            DecodeError::NoAddresses => "no_addresses",
            DecodeError::BadAuthType(_) => "bad_auth_type",
        }
    }
}

impl Advert {
    /// The VRRP payload (what follows the IPv4 header); v3 uses the pseudo-header checksum keepalived sends by default.
    pub fn encode(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        self.encode_with(src, dst, ChecksumForm::PseudoHeader)
    }

    /// Like `encode` with an explicit v3 checksum form (v2 is always `Plain`); out-of-range fields are clamped: interval to 255 s / 4095 cs, addresses to the first 255.
    pub fn encode_with(&self, src: Ipv4Addr, dst: Ipv4Addr, form: ChecksumForm) -> Vec<u8> {
        let addrs = &self.addresses[..self.addresses.len().min(MAX_ADDRESSES)];
        let v2 = self.version == Version::V2;
        let len = HEADER_LEN + 4 * addrs.len() + if v2 { AUTH_LEN } else { 0 };
        let mut buf = Vec::with_capacity(len);
        buf.push(self.version.number() << 4 | TYPE_ADVERT);
        buf.push(self.vrid);
        buf.push(self.priority);
        buf.push(addrs.len() as u8);
        if v2 {
            buf.push(if self.auth_pass.is_some() {
                AUTH_PASS
            } else {
                AUTH_NONE
            });
            buf.push(self.interval.min(V2_INTERVAL_MAX) as u8);
        } else {
            // The top 4 bits are reserved and must be sent as zero.
            buf.extend_from_slice(&self.interval.min(V3_INTERVAL_MAX).to_be_bytes());
        }
        buf.extend_from_slice(&[0, 0]);
        for a in addrs {
            buf.extend_from_slice(&a.octets());
        }
        if v2 {
            // Auth data is present even without authentication (RFC 3768 §5.3.10).
            buf.extend_from_slice(&self.auth_pass.unwrap_or([0; AUTH_LEN]));
        }
        debug_assert_eq!(buf.len(), len);
        let start = match (self.version, form) {
            (Version::V3, ChecksumForm::PseudoHeader) => pseudo_header_sum(src, dst, len),
            _ => 0,
        };
        let sum = checksum(start, &buf);
        buf[6..8].copy_from_slice(&sum.to_be_bytes());
        buf
    }

    /// Decodes and validates a VRRP payload received from `src` to `dst` (the IPv4 header's addresses); v2 always reports `Plain`.
    pub fn decode(
        payload: &[u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<(Advert, ChecksumForm), DecodeError> {
        if payload.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        let version = match payload[0] >> 4 {
            2 => Version::V2,
            3 => Version::V3,
            v => return Err(DecodeError::BadVersion(v)),
        };
        let ty = payload[0] & 0x0f;
        if ty != TYPE_ADVERT {
            return Err(DecodeError::BadType(ty));
        }
        let count = usize::from(payload[3]);
        let v2 = version == Version::V2;
        let expected = HEADER_LEN + 4 * count + if v2 { AUTH_LEN } else { 0 };
        // Exact: the caller slices by the IP total length, so extra bytes mean a malformed sender.
        if payload.len() != expected {
            return Err(DecodeError::BadLength);
        }
        // Checksum before field semantics: a corrupted packet should be counted as corrupted.
        let form = if v2 {
            if checksum(0, payload) != 0 {
                return Err(DecodeError::BadChecksum);
            }
            ChecksumForm::Plain
        } else if checksum(pseudo_header_sum(src, dst, payload.len()), payload) == 0 {
            ChecksumForm::PseudoHeader
        } else if checksum(0, payload) == 0 {
            ChecksumForm::Plain
        } else {
            return Err(DecodeError::BadChecksum);
        };
        if count == 0 {
            return Err(DecodeError::NoAddresses);
        }
        let addresses = payload[HEADER_LEN..HEADER_LEN + 4 * count]
            .chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect();
        let (interval, auth_pass) = if v2 {
            let auth = match payload[4] {
                AUTH_NONE => None,
                AUTH_PASS => {
                    let mut pass = [0; AUTH_LEN];
                    pass.copy_from_slice(&payload[expected - AUTH_LEN..]);
                    Some(pass)
                }
                t => return Err(DecodeError::BadAuthType(t)),
            };
            (u16::from(payload[5]), auth)
        } else {
            // Reserved bits are ignored on receipt (RFC 5798 §5.2.6).
            (
                u16::from_be_bytes([payload[4], payload[5]]) & V3_INTERVAL_MAX,
                None,
            )
        };
        let ad = Advert {
            version,
            vrid: payload[1],
            priority: payload[2],
            interval,
            addresses,
            auth_pass,
        };
        Ok((ad, form))
    }

    /// The advertised interval as a duration (what the state machine takes).
    pub fn interval_duration(&self) -> Duration {
        self.version.interval_duration(self.interval)
    }
}

/// What the agent needs from a received IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Received TTL (255 for a genuine on-link VRRP sender).
    pub ttl: u8,
    /// Source address: the sender's primary address.
    pub src: Ipv4Addr,
    /// Destination: the VRRP group or, for unicast, our address.
    pub dst: Ipv4Addr,
    /// IP protocol (112 for VRRP).
    pub proto: u8,
    /// Header length in bytes, options included.
    pub header_len: usize,
    /// The header's total length, at most the buffer's length; anything past it is link padding.
    pub total_len: usize,
}

impl Ipv4Info {
    /// The bytes after the IP header up to its total length, from the buffer given to `parse_ipv4`.
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.header_len..self.total_len).unwrap_or(&[])
    }
}

/// Parses the IPv4 header at the start of a raw-socket buffer.
pub fn parse_ipv4(buf: &[u8]) -> Result<Ipv4Info, DecodeError> {
    if buf.len() < IPV4_MIN_HEADER {
        return Err(DecodeError::TooShort);
    }
    let version = buf[0] >> 4;
    if version != 4 {
        return Err(DecodeError::NotIpv4(version));
    }
    let header_len = usize::from(buf[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if header_len < IPV4_MIN_HEADER || total_len < header_len || total_len > buf.len() {
        return Err(DecodeError::BadIpHeader);
    }
    Ok(Ipv4Info {
        ttl: buf[8],
        proto: buf[9],
        src: Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
        dst: Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
        header_len,
        total_len,
    })
}

/// What the local instance expects of adverts (from configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Configured protocol version.
    pub version: Version,
    /// Our virtual router ID.
    pub vrid: u8,
    /// v2: whole seconds, must match exactly; unused for v3 (the interval is learned).
    pub interval: u16,
    /// v2 only: the simple password, None = no authentication.
    pub auth_pass: Option<[u8; 8]>,
    /// Adverts arrive by multicast (TTL must be 255) rather than unicast (any TTL).
    pub multicast: bool,
}

/// Every name `check` can return, so counters can be registered up front.
pub const CHECK_REASONS: [&str; 5] = [
    "other_vrid",
    "bad_ttl",
    "wrong_version",
    "auth_mismatch",
    "interval_mismatch",
];

/// Checks a decoded advert against our instance; Err is one of `CHECK_REASONS`.
pub fn check(ad: &Advert, ttl: u8, expect: &Expect) -> Result<(), &'static str> {
    // VRID first: adverts of other virtual routers on the segment are normal traffic, and
    // keepalived too demultiplexes by VRID before any other check.
    if ad.vrid != expect.vrid {
        return Err("other_vrid");
    }
    // TTL 255 proves the sender is on-link; unicast peers may sit behind routers.
    if expect.multicast && ttl != VRRP_TTL {
        return Err("bad_ttl");
    }
    if ad.version != expect.version {
        return Err("wrong_version");
    }
    if expect.version == Version::V2 {
        // Authentication before the interval, as keepalived does: a stranger's advert is
        // an authentication failure whatever its interval.
        if ad.auth_pass != expect.auth_pass {
            return Err("auth_mismatch");
        }
        // RFC 3768 §7.1: differing intervals in v2 would let two masters coexist.
        if ad.interval != expect.interval {
            return Err("interval_mismatch");
        }
    }
    Ok(())
}

/// The 8-byte auth data for a configured password: truncated to 8 bytes (as keepalived does) and zero-padded.
pub fn pass_bytes(s: &str) -> [u8; 8] {
    let mut out = [0; AUTH_LEN];
    let b = s.as_bytes();
    let n = b.len().min(AUTH_LEN);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// Unfolded one's-complement sum of the IPv4 pseudo-header (RFC 5798 §5.2.8).
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, vrrp_len: usize) -> u32 {
    let mut ph = [0u8; 12];
    ph[..4].copy_from_slice(&src.octets());
    ph[4..8].copy_from_slice(&dst.octets());
    ph[9] = VRRP_PROTO;
    ph[10..].copy_from_slice(&(vrrp_len as u16).to_be_bytes());
    add_words(0, &ph)
}

fn add_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        // Fold as we go so any length fits in u32.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Internet checksum (RFC 1071) of `data` on top of a partial sum; verifying a packet whose checksum field is filled in yields 0.
fn checksum(start: u32, data: &[u8]) -> u16 {
    let mut sum = add_words(start, data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const VIP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);

    /// Deliberately naive RFC 1071 checksum over the concatenation of `parts`, kept independent of the code under test.
    fn ref_checksum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u64 = 0;
        for pair in bytes.chunks(2) {
            let hi = u64::from(pair[0]);
            let lo = u64::from(*pair.get(1).unwrap_or(&0));
            sum += (hi << 8) | lo;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ref_pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&src.octets());
        v.extend_from_slice(&dst.octets());
        v.extend_from_slice(&[0, 112]);
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    /// Rewrites the checksum of a hand-made message (plain form).
    fn fix_plain(mut p: Vec<u8>) -> Vec<u8> {
        p[6] = 0;
        p[7] = 0;
        let c = ref_checksum(&[&p]);
        p[6..8].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// Rewrites the checksum of a hand-made v3 message (pseudo-header form).
    fn fix_pseudo(mut p: Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        p[6] = 0;
        p[7] = 0;
        let c = ref_checksum(&[&ref_pseudo(src, dst, p.len() as u16), &p]);
        p[6..8].copy_from_slice(&c.to_be_bytes());
        p
    }

    // v2, auth "pass1122", vrid 51, priority 100, advert_int 1 s, one address.
    const V2_PKT: [u8; 20] = [
        0x21, // version 2 | type 1 (advertisement)
        0x33, // vrid 51
        0x64, // priority 100
        0x01, // count_ip 1
        0x01, // auth type 1 (simple text password)
        0x01, // adver_int 1 s
        0x6c, 0x1b, // checksum over these 20 bytes
        0xc6, 0x12, 0x00, 0x64, // 198.18.0.100
        b'p', b'a', b's', b's', b'1', b'1', b'2', b'2', // auth data
    ];

    // v3, vrid 51, priority 110, interval 10 cs, two addresses, pseudo-header checksum
    // for 198.18.0.2 -> 224.0.0.18.
    const V3_PKT_PSEUDO: [u8; 16] = [
        0x31, // version 3 | type 1
        0x33, // vrid 51
        0x6e, // priority 110
        0x02, // count_ip 2
        0x00, 0x0a, // rsvd 0 | max_adver_int 10 cs
        0x2d, 0x2a, // checksum incl. pseudo-header
        0xc6, 0x12, 0x00, 0x64, // 198.18.0.100
        0xc6, 0x12, 0x00, 0x65, // 198.18.0.101
    ];

    // The same message with the checksum over the VRRP message only.
    const V3_PKT_PLAIN: [u8; 16] = [
        0x31, 0x33, 0x6e, 0x02, 0x00, 0x0a, //
        0xd3, 0xd1, // checksum without pseudo-header
        0xc6, 0x12, 0x00, 0x64, //
        0xc6, 0x12, 0x00, 0x65, //
    ];

    fn v2_advert() -> Advert {
        Advert {
            version: Version::V2,
            vrid: 51,
            priority: 100,
            interval: 1,
            addresses: vec![VIP],
            auth_pass: Some(pass_bytes("pass1122")),
        }
    }

    fn v3_advert() -> Advert {
        Advert {
            version: Version::V3,
            vrid: 51,
            priority: 110,
            interval: 10,
            addresses: vec![VIP, VIP2],
            auth_pass: None,
        }
    }

    fn v2_expect() -> Expect {
        Expect {
            version: Version::V2,
            vrid: 51,
            interval: 1,
            auth_pass: Some(pass_bytes("pass1122")),
            multicast: true,
        }
    }

    fn v3_expect() -> Expect {
        Expect {
            version: Version::V3,
            vrid: 51,
            interval: 100,
            auth_pass: None,
            multicast: true,
        }
    }

    #[test]
    fn pinned_checksums_match_reference() {
        let mut v2 = V2_PKT;
        v2[6..8].fill(0);
        assert_eq!(ref_checksum(&[&v2]), 0x6c1b);

        let mut v3 = V3_PKT_PSEUDO;
        v3[6..8].fill(0);
        let ph = ref_pseudo(SRC, VRRP_MCAST, 16);
        assert_eq!(ref_checksum(&[&ph, &v3]), 0x2d2a);
        assert_eq!(ref_checksum(&[&v3]), 0xd3d1);
    }

    #[test]
    fn v2_encode_exact_and_round_trip() {
        let bytes = v2_advert().encode(SRC, VRRP_MCAST);
        assert_eq!(bytes, V2_PKT);
        let (ad, form) = Advert::decode(&V2_PKT, SRC, VRRP_MCAST).unwrap();
        assert_eq!(ad, v2_advert());
        assert_eq!(form, ChecksumForm::Plain);
        // The v2 checksum does not cover addresses, so any src/dst decodes.
        assert!(Advert::decode(&V2_PKT, VIP, VIP2).is_ok());
    }

    #[test]
    fn v2_without_auth_round_trips_with_zero_auth_data() {
        let ad = Advert {
            auth_pass: None,
            ..v2_advert()
        };
        let bytes = ad.encode(SRC, VRRP_MCAST);
        assert_eq!(bytes[4], 0);
        assert_eq!(&bytes[12..], &[0; 8]);
        assert_eq!(ref_checksum(&[&bytes]), 0);
        let (back, _) = Advert::decode(&bytes, SRC, VRRP_MCAST).unwrap();
        assert_eq!(back, ad);
    }

    #[test]
    fn v3_pseudo_header_encode_exact_and_round_trip() {
        let bytes = v3_advert().encode(SRC, VRRP_MCAST);
        assert_eq!(bytes, V3_PKT_PSEUDO);
        let (ad, form) = Advert::decode(&V3_PKT_PSEUDO, SRC, VRRP_MCAST).unwrap();
        assert_eq!(ad, v3_advert());
        assert_eq!(form, ChecksumForm::PseudoHeader);
    }

    #[test]
    fn v3_plain_encode_exact_and_round_trip() {
        let bytes = v3_advert().encode_with(SRC, VRRP_MCAST, ChecksumForm::Plain);
        assert_eq!(bytes, V3_PKT_PLAIN);
        let (ad, form) = Advert::decode(&V3_PKT_PLAIN, SRC, VRRP_MCAST).unwrap();
        assert_eq!(ad, v3_advert());
        assert_eq!(form, ChecksumForm::Plain);
        // Plain does not depend on the addresses.
        assert!(Advert::decode(&V3_PKT_PLAIN, VIP, VIP2).is_ok());
    }

    #[test]
    fn v3_pseudo_header_checks_the_real_destination() {
        // Unicast: the pseudo-header carries the peer address, not the group.
        let peer = Ipv4Addr::new(198, 18, 0, 3);
        let bytes = v3_advert().encode(SRC, peer);
        assert_eq!(
            Advert::decode(&bytes, SRC, peer).unwrap().1,
            ChecksumForm::PseudoHeader
        );
        assert_eq!(
            Advert::decode(&bytes, SRC, VRRP_MCAST),
            Err(DecodeError::BadChecksum)
        );
        assert_eq!(
            Advert::decode(&V3_PKT_PSEUDO, VIP, VRRP_MCAST),
            Err(DecodeError::BadChecksum)
        );
    }

    #[test]
    fn encode_clamps_out_of_range_fields() {
        let ad = Advert {
            interval: 300,
            ..v2_advert()
        };
        assert_eq!(ad.encode(SRC, VRRP_MCAST)[5], 255);
        let ad = Advert {
            interval: 0xffff,
            ..v3_advert()
        };
        let b = ad.encode(SRC, VRRP_MCAST);
        assert_eq!(&b[4..6], &[0x0f, 0xff]);
        let ad = Advert {
            addresses: vec![VIP; 300],
            ..v3_advert()
        };
        let b = ad.encode(SRC, VRRP_MCAST);
        assert_eq!(b[3], 255);
        assert_eq!(b.len(), 8 + 4 * 255);
        assert_eq!(
            Advert::decode(&b, SRC, VRRP_MCAST)
                .unwrap()
                .0
                .addresses
                .len(),
            255
        );
    }

    #[test]
    fn v3_reserved_bits_are_ignored() {
        let mut p = V3_PKT_PSEUDO.to_vec();
        p[4] |= 0xf0;
        let p = fix_pseudo(p, SRC, VRRP_MCAST);
        let (ad, _) = Advert::decode(&p, SRC, VRRP_MCAST).unwrap();
        assert_eq!(ad.interval, 10);
    }

    #[test]
    fn decode_too_short() {
        assert_eq!(
            Advert::decode(&V3_PKT_PSEUDO[..7], SRC, VRRP_MCAST),
            Err(DecodeError::TooShort)
        );
        assert_eq!(
            Advert::decode(&[], SRC, VRRP_MCAST),
            Err(DecodeError::TooShort)
        );
    }

    #[test]
    fn decode_bad_version() {
        for v in [0u8, 1, 4, 15] {
            let mut p = V3_PKT_PLAIN.to_vec();
            p[0] = v << 4 | 1;
            let p = fix_plain(p);
            assert_eq!(
                Advert::decode(&p, SRC, VRRP_MCAST),
                Err(DecodeError::BadVersion(v))
            );
        }
    }

    #[test]
    fn decode_bad_type() {
        let mut p = V2_PKT.to_vec();
        p[0] = 0x22;
        let p = fix_plain(p);
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadType(2))
        );
    }

    #[test]
    fn decode_bad_length() {
        // v2 without its auth data.
        assert_eq!(
            Advert::decode(&V2_PKT[..12], SRC, VRRP_MCAST),
            Err(DecodeError::BadLength)
        );
        // v3 with one address missing.
        assert_eq!(
            Advert::decode(&V3_PKT_PSEUDO[..12], SRC, VRRP_MCAST),
            Err(DecodeError::BadLength)
        );
        // Trailing garbage.
        let mut p = V3_PKT_PLAIN.to_vec();
        p.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadLength)
        );
        // A count claiming more addresses than present.
        let mut p = V2_PKT.to_vec();
        p[3] = 2;
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadLength)
        );
    }

    #[test]
    fn decode_bad_checksum() {
        let mut p = V2_PKT;
        p[2] = 101;
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadChecksum)
        );
        // The v2 checksum covers the auth data.
        let mut p = V2_PKT;
        p[19] ^= 1;
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadChecksum)
        );
        for pkt in [V3_PKT_PSEUDO, V3_PKT_PLAIN] {
            let mut p = pkt;
            p[15] ^= 0x80;
            assert_eq!(
                Advert::decode(&p, SRC, VRRP_MCAST),
                Err(DecodeError::BadChecksum)
            );
        }
    }

    #[test]
    fn decode_no_addresses() {
        let v3 = fix_pseudo(vec![0x31, 51, 110, 0, 0x00, 0x0a, 0, 0], SRC, VRRP_MCAST);
        assert_eq!(
            Advert::decode(&v3, SRC, VRRP_MCAST),
            Err(DecodeError::NoAddresses)
        );
        let mut v2 = vec![0x21, 51, 100, 0, 0, 1, 0, 0];
        v2.extend_from_slice(&[0; 8]);
        let v2 = fix_plain(v2);
        assert_eq!(
            Advert::decode(&v2, SRC, VRRP_MCAST),
            Err(DecodeError::NoAddresses)
        );
    }

    #[test]
    fn decode_bad_auth_type() {
        let mut p = V2_PKT.to_vec();
        p[4] = 2; // IP AH: never sent with protocol 112, not supported.
        let p = fix_plain(p);
        assert_eq!(
            Advert::decode(&p, SRC, VRRP_MCAST),
            Err(DecodeError::BadAuthType(2))
        );
    }

    #[test]
    fn reasons_are_stable_and_listed() {
        let all = [
            (DecodeError::TooShort, "too_short"),
            (DecodeError::NotIpv4(6), "not_ipv4"),
            (DecodeError::BadIpHeader, "bad_ip_header"),
            (DecodeError::BadVersion(1), "bad_version"),
            (DecodeError::BadType(2), "bad_type"),
            (DecodeError::BadLength, "bad_length"),
            (DecodeError::BadChecksum, "bad_checksum"),
            (DecodeError::NoAddresses, "no_addresses"),
            (DecodeError::BadAuthType(2), "bad_auth_type"),
        ];
        assert_eq!(all.len(), DecodeError::REASONS.len());
        for (e, name) in all {
            assert_eq!(e.reason(), name);
            assert!(DecodeError::REASONS.contains(&name));
            assert!(!e.to_string().is_empty());
        }
    }

    /// A 20-byte IPv4 header carrying `payload`.
    fn ipv4(ttl: u8, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut h = vec![
            0x45, 0xc0, 0, 0, // version 4, IHL 5, DSCP CS6, total length (below)
            0, 0, 0, 0, // id, flags, fragment offset
            ttl, 112, 0, 0, // ttl, proto VRRP, header checksum (not checked)
            198, 18, 0, 2, // src
            224, 0, 0, 18, // dst
        ];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    #[test]
    fn parse_ipv4_header_and_payload() {
        let mut buf = ipv4(255, &V3_PKT_PSEUDO);
        // Link-layer padding after the IP total length must not reach the decoder.
        buf.extend_from_slice(&[0; 6]);
        let info = parse_ipv4(&buf).unwrap();
        assert_eq!(
            info,
            Ipv4Info {
                ttl: 255,
                src: SRC,
                dst: VRRP_MCAST,
                proto: VRRP_PROTO,
                header_len: 20,
                total_len: 36,
            }
        );
        let payload = info.payload(&buf);
        assert_eq!(payload, V3_PKT_PSEUDO);
        let (ad, form) = Advert::decode(payload, info.src, info.dst).unwrap();
        assert_eq!(ad, v3_advert());
        assert_eq!(form, ChecksumForm::PseudoHeader);
    }

    #[test]
    fn parse_ipv4_with_options() {
        let mut buf = ipv4(255, &V2_PKT);
        buf[0] = 0x46;
        buf.splice(20..20, [1, 1, 1, 0]); // four bytes of NOP/EOL options
        let total = buf.len() as u16;
        buf[2..4].copy_from_slice(&total.to_be_bytes());
        let info = parse_ipv4(&buf).unwrap();
        assert_eq!(info.header_len, 24);
        assert_eq!(info.payload(&buf), V2_PKT);
    }

    #[test]
    fn parse_ipv4_errors() {
        assert_eq!(parse_ipv4(&[0x45; 19]), Err(DecodeError::TooShort));
        let mut b = ipv4(255, &V2_PKT);
        b[0] = 0x65;
        assert_eq!(parse_ipv4(&b), Err(DecodeError::NotIpv4(6)));
        let mut b = ipv4(255, &V2_PKT);
        b[0] = 0x44; // IHL below the minimum
        assert_eq!(parse_ipv4(&b), Err(DecodeError::BadIpHeader));
        let mut b = ipv4(255, &V2_PKT);
        b[0] = 0x4f; // IHL past the end of a short buffer
        b.truncate(40);
        b[2..4].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(parse_ipv4(&b), Err(DecodeError::BadIpHeader));
        let mut b = ipv4(255, &V2_PKT);
        b[2..4].copy_from_slice(&100u16.to_be_bytes()); // truncated packet
        assert_eq!(parse_ipv4(&b), Err(DecodeError::BadIpHeader));
        let mut b = ipv4(255, &V2_PKT);
        b[2..4].copy_from_slice(&19u16.to_be_bytes()); // shorter than its header
        assert_eq!(parse_ipv4(&b), Err(DecodeError::BadIpHeader));
    }

    #[test]
    fn check_accepts_matching_adverts() {
        assert_eq!(check(&v2_advert(), 255, &v2_expect()), Ok(()));
        assert_eq!(check(&v3_advert(), 255, &v3_expect()), Ok(()));
        let unicast = Expect {
            multicast: false,
            ..v2_expect()
        };
        assert_eq!(check(&v2_advert(), 64, &unicast), Ok(()));
        let no_auth = Expect {
            auth_pass: None,
            ..v2_expect()
        };
        let ad = Advert {
            auth_pass: None,
            ..v2_advert()
        };
        assert_eq!(check(&ad, 255, &no_auth), Ok(()));
    }

    #[test]
    fn check_bad_ttl() {
        assert_eq!(check(&v2_advert(), 254, &v2_expect()), Err("bad_ttl"));
        assert_eq!(check(&v3_advert(), 1, &v3_expect()), Err("bad_ttl"));
    }

    #[test]
    fn check_wrong_version() {
        assert_eq!(check(&v3_advert(), 255, &v2_expect()), Err("wrong_version"));
        assert_eq!(check(&v2_advert(), 255, &v3_expect()), Err("wrong_version"));
    }

    #[test]
    fn check_other_vrid_comes_first() {
        let ad = Advert {
            vrid: 52,
            ..v2_advert()
        };
        assert_eq!(check(&ad, 255, &v2_expect()), Err("other_vrid"));
        // Another router's traffic is not an error of ours, whatever else is wrong with it.
        let ad = Advert {
            vrid: 52,
            interval: 3,
            ..v3_advert()
        };
        assert_eq!(check(&ad, 1, &v2_expect()), Err("other_vrid"));
    }

    #[test]
    fn check_interval_mismatch_v2_only() {
        let ad = Advert {
            interval: 2,
            ..v2_advert()
        };
        assert_eq!(check(&ad, 255, &v2_expect()), Err("interval_mismatch"));
        // v3 learns the master's interval instead.
        let ad = Advert {
            interval: 500,
            ..v3_advert()
        };
        assert_eq!(check(&ad, 255, &v3_expect()), Ok(()));
    }

    #[test]
    fn check_auth_mismatch() {
        let wrong = Advert {
            auth_pass: Some(pass_bytes("pass1123")),
            ..v2_advert()
        };
        assert_eq!(check(&wrong, 255, &v2_expect()), Err("auth_mismatch"));
        let none = Advert {
            auth_pass: None,
            ..v2_advert()
        };
        assert_eq!(check(&none, 255, &v2_expect()), Err("auth_mismatch"));
        let unexpected = Expect {
            auth_pass: None,
            ..v2_expect()
        };
        assert_eq!(check(&v2_advert(), 255, &unexpected), Err("auth_mismatch"));
        // v3 has no authentication field; a configured password does not apply.
        let v3_pass = Expect {
            auth_pass: Some(pass_bytes("x")),
            ..v3_expect()
        };
        assert_eq!(check(&v3_advert(), 255, &v3_pass), Ok(()));
    }

    #[test]
    fn check_reasons_listed() {
        for r in [
            "bad_ttl",
            "wrong_version",
            "other_vrid",
            "interval_mismatch",
            "auth_mismatch",
        ] {
            assert!(CHECK_REASONS.contains(&r));
        }
    }

    #[test]
    fn pass_bytes_pads_and_truncates() {
        assert_eq!(pass_bytes(""), [0; 8]);
        assert_eq!(pass_bytes("abc"), *b"abc\0\0\0\0\0");
        assert_eq!(pass_bytes("pass1122"), *b"pass1122");
        assert_eq!(pass_bytes("pass1122extra"), *b"pass1122");
    }

    #[test]
    fn interval_conversions() {
        assert_eq!(Version::V2.interval_duration(1), Duration::from_secs(1));
        assert_eq!(
            Version::V3.interval_duration(10),
            Duration::from_millis(100)
        );
        assert_eq!(Version::V3.interval_field(Duration::from_millis(100)), 10);
        assert_eq!(Version::V3.interval_field(Duration::from_millis(105)), 10);
        assert_eq!(Version::V3.interval_field(Duration::ZERO), 1);
        assert_eq!(Version::V3.interval_field(Duration::from_secs(100)), 4095);
        assert_eq!(Version::V2.interval_field(Duration::from_secs(1)), 1);
        assert_eq!(Version::V2.interval_field(Duration::from_millis(500)), 1);
        assert_eq!(Version::V2.interval_field(Duration::from_secs(1000)), 255);
        assert_eq!(v3_advert().interval_duration(), Duration::from_millis(100));
        assert_eq!(v2_advert().interval_duration(), Duration::from_secs(1));
    }
}
