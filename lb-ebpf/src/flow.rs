//! The flow tables. FLOWS holds established connections, HALF_OPEN the ones whose backend
//! has not answered past the handshake; both are keyed by a packet's tuple as it arrives
//! and hold the ready-made rewrite, one entry per direction. Only a SYN creates a flow, in
//! HALF_OPEN; the backend's first packet after its SYN-ACK moves it to FLOWS. A SYN flood
//! can thus fill HALF_OPEN (whose ports are recycled first) but never evict an established
//! connection.

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    maps::LruHashMap,
};
use lb_common::{
    flow_flags, maglev_index, reason, state, BackendInfo, Flow, FlowKey, VipInfo, NO_BACKEND,
    SNAT_TRIES,
};

use crate::{stats, BACKENDS, CLOCK, FLOWS, HALF_OPEN, MAGLEV, SNAT_CURSOR};

/// How stale `last_seen_ns` may get before a packet refreshes it: writing it on every
/// packet dirties a cache line other CPUs read, for a value only compared with seconds.
const TOUCH_NS: u64 = 100_000_000;

/// Monotonic time for flow ages and the timestamp clock. The coarse clock (a tick's
/// resolution) is all they need, and it only moves on a tick: each CPU keeps the last value
/// with the jiffies it was read at, so most packets pay one load (the verifier inlines
/// bpf_jiffies64) instead of a helper call, a tenth of an established packet's cost. A
/// packet between a tick's jiffies and clock updates caches a clock one tick old until the
/// next tick: still monotonic, a few ms late.
#[inline(always)]
pub fn now() -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; XDP runs with preemption off.
    unsafe {
        if (*c).jiffies != jiffies || (*c).ns == 0 {
            (*c).ns = bpf_ktime_get_coarse_ns();
            (*c).jiffies = jiffies;
        }
        (*c).ns
    }
}

/// Which table an entry was found in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    HalfOpen,
}

impl Table {
    #[inline(always)]
    fn map(self) -> &'static LruHashMap<FlowKey, Flow> {
        match self {
            Table::Established => &FLOWS,
            Table::HalfOpen => &HALF_OPEN,
        }
    }
}

/// The entry for a packet arriving with `key`: established connections first.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<(*mut Flow, Table)> {
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        return Some((f, Table::Established));
    }
    HALF_OPEN.get_ptr_mut(key).map(|f| (f, Table::HalfOpen))
}

/// Sets flag bits on an entry. Atomic: both directions of a connection, on two CPUs, set
/// bits on both entries.
#[inline(always)]
pub fn mark(f: *mut Flow, bits: u32) {
    // SAFETY: an aligned u32 in a map value; every writer of `flags` uses an atomic or.
    unsafe { atomic_or::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*f).flags, bits) };
}

/// Records FIN/RST bits on the entry and its peer, which decide when the port is reused.
#[inline(always)]
pub fn close(table: Table, f: *mut Flow, bits: u32, now: u64) {
    mark(f, bits);
    unsafe { (*f).last_seen_ns = now };
    let peer = unsafe { (*f).peer_key() };
    if let Some(p) = table.map().get_ptr_mut(peer) {
        mark(p, bits);
    }
}

/// Refreshes the entry's age, at most every TOUCH_NS.
#[inline(always)]
pub fn touch(f: *mut Flow, now: u64) {
    unsafe {
        if now.wrapping_sub((*f).last_seen_ns) > TOUCH_NS {
            (*f).last_seen_ns = now;
        }
    }
}

/// Removes both entries of the connection `f` (found under `key`) belongs to.
#[inline(always)]
pub fn remove(table: Table, key: &FlowKey, f: &Flow) {
    let _ = table.map().remove(f.peer_key());
    let _ = table.map().remove(key);
}

/// True when the flow's backend no longer takes its packets (down, or removed).
#[inline(always)]
pub fn backend_gone(f: &Flow) -> bool {
    match BACKENDS.get(f.backend) {
        Some(b) => b.state == state::DOWN || b.state == state::UNUSED,
        None => true,
    }
}

/// Moves a half-open connection to FLOWS: its backend (`rev`, the backend -> client entry
/// under `rev_key`) answered past the handshake, so a client is really there. FLOWS gets
/// both entries before HALF_OPEN loses them, so a port allocation on another CPU always
/// sees one owner.
///
/// Returns the reply entry's new place, or None when the connection left HALF_OPEN under us
/// (its port recycled by a SYN flood).
#[inline(always)]
pub fn promote(rev_key: &FlowKey, rev: &Flow) -> Option<*mut Flow> {
    let fwd_key = rev.peer_key();
    let fwd = unsafe { HALF_OPEN.get(fwd_key) }?;
    let mut fwd = *fwd;
    let mut rev = *rev;
    fwd.flags |= flow_flags::ESTABLISHED;
    rev.flags |= flow_flags::ESTABLISHED;
    if FLOWS.insert(fwd_key, fwd, BPF_ANY as u64).is_err() {
        return None;
    }
    if FLOWS.insert(rev_key, rev, BPF_ANY as u64).is_err() {
        let _ = FLOWS.remove(fwd_key);
        return None;
    }
    let _ = HALF_OPEN.remove(rev_key);
    let _ = HALF_OPEN.remove(fwd_key);
    stats::reason(reason::ESTABLISHED);
    FLOWS.get_ptr_mut(rev_key)
}

/// murmur3's mixing over the 5-tuple: the Maglev slot of a new flow.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    #[inline(always)]
    fn mix(h: u32, w: u32) -> u32 {
        let k = w
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = mix(0x9747_b28c, k.src_addr);
    h = mix(h, k.dst_addr);
    h = mix(h, ((k.src_port as u32) << 16) | k.dst_port as u32);
    h = mix(h, k.proto as u32);
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Picks the backend for a new flow from the VIP's live Maglev table.
#[inline(always)]
pub fn pick(key: &FlowKey, vip: &VipInfo) -> Result<(u32, BackendInfo), u32> {
    if vip.table_size == 0 {
        return Err(reason::DROP_NO_BACKEND);
    }
    let pos = flow_hash(key) % vip.table_size;
    let slot = maglev_index(vip.index, vip.active_half & 1, pos);
    let index = *MAGLEV.get(slot).ok_or(reason::DROP_NO_BACKEND)?;
    if index == NO_BACKEND {
        return Err(reason::DROP_NO_BACKEND);
    }
    let backend = *BACKENDS.get(index).ok_or(reason::DROP_NO_BACKEND)?;
    if backend.state != state::UP {
        return Err(reason::DROP_NO_BACKEND);
    }
    Ok((index, backend))
}

/// Finds a SNAT port towards `backend` and claims it with the reply entry `rev` in
/// HALF_OPEN.
///
/// Ports are taken in turn from a per-backend ring over the range rather than at random:
/// a port then comes back only after the whole range has been used, which keeps new SYNs
/// away from the TIME_WAIT the backend holds for 60 s after it closed the previous
/// connection on that port (a SYN that hits it stalls the client for a second). The same
/// order makes a SYN flood harmless to the port space: a half-open connection found on the
/// ring is the oldest of its backend's, and its port is recycled; an established one is
/// skipped unless it ended.
#[inline(always)]
fn alloc_port(
    vip: &VipInfo,
    index: u32,
    backend: &BackendInfo,
    rev: &Flow,
    now: u64,
) -> Result<u16, u32> {
    let min = vip.snat_port_min as u32;
    let max = vip.snat_port_max as u32;
    if max < min {
        return Err(reason::DROP_SNAT_EXHAUSTED);
    }
    let range = max - min + 1;
    let cursor = SNAT_CURSOR
        .get_ptr_mut(index)
        .ok_or(reason::DROP_SNAT_EXHAUSTED)?;
    // A try can also fail for want of a free HALF_OPEN element (the LRU's free lists
    // contended under a flood): counted apart, since no port was short.
    let mut why = reason::DROP_SNAT_EXHAUSTED;
    // Connections opened back to back hold consecutive ports of the ring (kubelets
    // reconnecting after a restart: hundreds per backend). Each try that fails makes the
    // next step four times longer, so SNAT_TRIES tries reach 5461 ports ahead instead of 8
    // and a SYN gets past such a block; ports jumped over wait one more turn. The step
    // follows the try's number, not what the tries met: a step carried from try to try
    // multiplied the verifier's states past its million instructions.
    for i in 0..SNAT_TRIES {
        let step = 1u64 << (2 * i);
        // SAFETY: an aligned u64 in a map value shared by all CPUs, only touched atomically.
        // SeqCst: for a relaxed add LLVM's BPF backend emits the legacy XADD, which returns
        // nothing, and then reads the result anyway (seen with LLVM 22).
        let turn: u64 =
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, step) };
        let off = (turn % range as u64) as u32;
        let port = ((min + off) as u16).to_be();
        let rkey = FlowKey::tcp(backend.addr, vip.snat_addr, backend.port, port);
        // HALF_OPEN first, FLOWS second: the reverse of `promote`'s order.
        let mut recycled: Option<FlowKey> = None;
        if HALF_OPEN.insert(rkey, rev, BPF_NOEXIST as u64).is_err() {
            if let Some(old) = unsafe { HALF_OPEN.get(rkey) } {
                recycled = Some(old.peer_key());
            }
            if HALF_OPEN.insert(rkey, rev, BPF_ANY as u64).is_err() {
                why = reason::DROP_FLOW_INSERT;
                continue;
            }
        }
        if let Some(est) = unsafe { FLOWS.get(rkey) } {
            let est = *est;
            if !est.over(now) {
                let _ = HALF_OPEN.remove(rkey);
                continue;
            }
            let _ = FLOWS.remove(est.peer_key());
            let _ = FLOWS.remove(rkey);
        }
        if let Some(k) = recycled {
            let _ = HALF_OPEN.remove(k);
            stats::reason(reason::HALF_OPEN_RECYCLED);
        }
        return Ok(port);
    }
    Err(why)
}

/// Where a SYN came from: its reply goes back the same way until the FIB is asked.
pub struct ReplyHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// False for a tagged SYN, whose reply needs the FIB and VLAN_DEVS to find its tag.
    pub usable: bool,
}

/// A new connection's forward entry towards backend `index` (Maglev's pick), not yet
/// inserted (the caller adds its next hop). The reply entry is in HALF_OPEN already,
/// holding the SNAT port.
///
/// `syn_tsval` is the SYN's TCP timestamp (0: none). The flow shifts the client's
/// timestamps so the backend sees one clock, this host's milliseconds, on every tuple: a
/// SYN reusing a tuple the backend still holds in TIME_WAIT then carries a newer timestamp
/// than the last connection's and is accepted (RFC 6191), where the client's own clock (a
/// random offset per connection on Linux) would fail PAWS half the time and stall a second.
///
/// `reply_hop` is where the SYN came from (MACs, interface): the reply goes back the same
/// way until its entry's next hop is refreshed from the FIB.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    vip: &VipInfo,
    index: u32,
    backend: &BackendInfo,
    syn_tsval: u32,
    reply_hop: &ReplyHop,
    now: u64,
) -> Result<Flow, u32> {
    let ts_off = if syn_tsval == 0 {
        0
    } else {
        // 0 means "no timestamps": a shift that happens to be 0 becomes 1 ms.
        ((now / 1_000_000) as u32).wrapping_sub(syn_tsval).max(1)
    };
    let mut rev = Flow {
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        backend: index,
        vip: vip.index,
        flags: flow_flags::REPLY,
        ts_delta: ts_off.wrapping_neg(),
        // Set whether used or not: a conditional copy of the interface index once made
        // LLVM spill a register the verifier took for a pointer.
        ifindex: reply_hop.ifindex,
        dmac: reply_hop.dmac,
        smac: reply_hop.smac,
        mtu: u16::MAX as u32,
        last_seen_ns: now,
        next_hop_ns: now,
    };
    if reply_hop.usable {
        rev.flags |= flow_flags::NEXT_HOP;
    }
    let port = alloc_port(vip, index, backend, &rev, now)?;
    Ok(Flow {
        src_addr: vip.snat_addr,
        dst_addr: backend.addr,
        src_port: port,
        dst_port: backend.port,
        backend: index,
        vip: vip.index,
        flags: 0,
        ts_delta: ts_off,
        // No next hop yet (no NEXT_HOP flag): the caller resolves it. The fields get the
        // reply's values rather than zeros, which LLVM would merge into a call of a
        // byte-by-byte memset subprogram.
        ifindex: reply_hop.ifindex,
        dmac: reply_hop.smac,
        smac: reply_hop.dmac,
        mtu: u16::MAX as u32,
        last_seen_ns: now,
        next_hop_ns: 0,
    })
}

/// Inserts a new connection's forward entry; without it the reply entry goes too.
#[inline(always)]
pub fn insert_forward(key: &FlowKey, fwd: &Flow) -> Result<(), u32> {
    if HALF_OPEN.insert(key, fwd, BPF_ANY as u64).is_err() {
        let _ = HALF_OPEN.remove(fwd.peer_key());
        return Err(reason::DROP_FLOW_INSERT);
    }
    Ok(())
}
