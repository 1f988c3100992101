//! Incremental Internet checksum updates (RFC 1624, eqn. 3): HC' = ~(~HC + ~m + m').
//!
//! Values are used exactly as they sit in the packet (no byte swapping): the one's complement
//! sum is byte-order independent as long as every word is read the same way.

/// Adds the change of a 32-bit field from `old` to `new` to an unfolded sum.
#[inline(always)]
pub fn diff32(sum: u32, old: u32, new: u32) -> u32 {
    let o = !old;
    sum + (o >> 16) + (o & 0xffff) + (new >> 16) + (new & 0xffff)
}

/// Adds the change of a 16-bit field from `old` to `new` to an unfolded sum.
#[inline(always)]
pub fn diff16(sum: u32, old: u16, new: u16) -> u32 {
    sum + (!old as u32 & 0xffff) + new as u32
}

/// Applies an unfolded difference `sum` to checksum `check`.
#[inline(always)]
pub fn apply(check: u16, sum: u32) -> u16 {
    let mut s = (!check as u32 & 0xffff) + sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Applies the change of a 32-bit field at an `odd` or even offset from the start of the
/// checksummed data. At an odd offset every byte sits in the other half of its 16-bit word,
/// which swaps the bytes of the one's complement difference.
#[inline(always)]
pub fn apply32(check: u16, old: u32, new: u32, odd: bool) -> u16 {
    apply_at(check, diff32(0, old, new), odd)
}

/// Applies the change of a 16-bit field at an `odd` or even offset (see `apply32`).
#[inline(always)]
pub fn apply16(check: u16, old: u16, new: u16, odd: bool) -> u16 {
    apply_at(check, diff16(0, old, new), odd)
}

/// Applies an unfolded difference of bytes at an `odd` or even offset.
#[inline(always)]
fn apply_at(check: u16, sum: u32, odd: bool) -> u16 {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    let s = if odd {
        (s as u16).swap_bytes()
    } else {
        s as u16
    };
    apply(check, s as u32)
}

/// Adds both 16-bit halves of a 32-bit value (as it sits in the packet) to a sum.
#[inline(always)]
pub fn add32(sum: u32, v: u32) -> u32 {
    sum + (v >> 16) + (v & 0xffff)
}

/// Folds an unfolded sum into the checksum of the data it covers.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
