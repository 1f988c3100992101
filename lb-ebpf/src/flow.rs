//! The flow table: which backend and SNAT port a client connection uses, Maglev for new
//! flows, and SNAT port allocation (a per-backend ring over the range).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    flow_flags, maglev_index, reason, state, BackendInfo, FlowKey, FlowValue, ReverseValue,
    VipInfo, IPPROTO_TCP, NO_BACKEND, SNAT_CLOSED_REUSE_NS, SNAT_IDLE_REUSE_NS, SNAT_TRIES,
};

use crate::{BACKENDS, FLOWS, MAGLEV, NAT_REVERSE, SNAT_CURSOR};

/// How stale `last_seen_ns` may get before a packet refreshes it: writing it on every
/// packet dirties a cache line other CPUs read, for a value only compared with seconds.
const TOUCH_NS: u64 = 100_000_000;

/// Monotonic time for flow ages and the timestamp clock; the coarse clock (a tick's
/// resolution) costs a fraction of the precise one and is all they need.
#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A flow's decision for this packet.
pub struct Decision {
    pub backend_index: u32,
    pub backend: BackendInfo,
    pub snat_addr: u32,
    pub snat_port: u16,
    pub new_flow: bool,
    /// Added to the client's TCP timestamps (see FlowValue::ts_off).
    pub ts_off: u32,
}

/// The NAT_REVERSE key of a flow: the backend's reply as it arrives.
#[inline(always)]
pub fn reverse_key(backend: &BackendInfo, snat_addr: u32, snat_port: u16) -> FlowKey {
    FlowKey {
        src_addr: backend.addr,
        dst_addr: snat_addr,
        src_port: backend.port,
        dst_port: snat_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// The FLOWS key of the client connection a NAT_REVERSE entry belongs to.
#[inline(always)]
pub fn forward_key(r: &ReverseValue) -> FlowKey {
    FlowKey {
        src_addr: r.client_addr,
        dst_addr: r.vip_addr,
        src_port: r.client_port,
        dst_port: r.vip_port,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn closed(flags: u8) -> bool {
    flags & flow_flags::RST != 0
        || flags & (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
            == (flow_flags::FIN_CLIENT | flow_flags::FIN_BACKEND)
}

/// murmur3's mixing over the 5-tuple: the Maglev slot of a new flow.
#[inline(always)]
fn flow_hash(k: &FlowKey) -> u32 {
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
fn pick(key: &FlowKey, vip: &VipInfo) -> Result<(u32, BackendInfo), u32> {
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

/// Finds a free SNAT port towards `backend` and claims it with a NAT_REVERSE entry.
///
/// Ports are taken in turn from a per-backend ring over the range rather than at random:
/// a port then comes back only after the whole range has been used, which keeps new SYNs
/// away from the TIME_WAIT the backend holds for 60 s after it closed the previous
/// connection on that port (a SYN that hits it stalls the client for a second).
#[inline(always)]
fn alloc_port(
    key: &FlowKey,
    vip: &VipInfo,
    index: u32,
    backend: &BackendInfo,
    now: u64,
    ts_off: u32,
) -> Result<u16, u32> {
    let min = vip.snat_port_min as u32;
    let max = vip.snat_port_max as u32;
    if max < min {
        return Err(reason::DROP_SNAT_EXHAUSTED);
    }
    let range = max - min + 1;
    let rev = ReverseValue {
        client_addr: key.src_addr,
        vip_addr: key.dst_addr,
        client_port: key.src_port,
        vip_port: key.dst_port,
        vip: vip.index,
        backend: index,
        flags: 0,
        _pad: [0; 3],
        ts_off,
        _pad2: 0,
        last_seen_ns: now,
    };
    let cursor = SNAT_CURSOR
        .get_ptr_mut(index)
        .ok_or(reason::DROP_SNAT_EXHAUSTED)?;
    for _ in 0..SNAT_TRIES {
        // SAFETY: an aligned u32 in a map value shared by all CPUs, only touched atomically.
        // SeqCst: for a relaxed add LLVM's BPF backend emits the legacy XADD, which returns
        // nothing, and then reads the result anyway (seen with LLVM 22).
        let turn: u64 = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
        let off = (turn % range as u64) as u32;
        let port = ((min + off) as u16).to_be();
        let rkey = reverse_key(backend, vip.snat_addr, port);
        if NAT_REVERSE.insert(rkey, rev, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        // Taken: a closed or long idle flow gives its port up.
        if let Some(old) = NAT_REVERSE.get_ptr(rkey) {
            let old = unsafe { *old };
            let idle = now.wrapping_sub(old.last_seen_ns);
            if (closed(old.flags) && idle > SNAT_CLOSED_REUSE_NS) || idle > SNAT_IDLE_REUSE_NS {
                let _ = FLOWS.remove(forward_key(&old));
                if NAT_REVERSE.insert(rkey, rev, BPF_ANY as u64).is_ok() {
                    return Ok(port);
                }
            }
        }
    }
    Err(reason::DROP_SNAT_EXHAUSTED)
}

/// Creates a flow: Maglev pick, SNAT port, reverse entry, then forward entry (rolled back on
/// failure so neither table holds half a flow).
///
/// `syn_tsval` is the SYN's TCP timestamp (0: none). The flow shifts the client's
/// timestamps so the backend sees one clock, this host's milliseconds, on every tuple: a
/// SYN reusing a tuple the backend still holds in TIME_WAIT then carries a newer timestamp
/// than the last connection's and is accepted (RFC 6191), where the client's own clock (a
/// random offset per connection on Linux) would fail PAWS half the time and stall a second.
#[inline(always)]
fn create(key: &FlowKey, vip: &VipInfo, now: u64, syn_tsval: u32) -> Result<Decision, u32> {
    let (index, backend) = pick(key, vip)?;
    let ts_off = if syn_tsval == 0 {
        0
    } else {
        // 0 means "no timestamps": a shift that happens to be 0 becomes 1 ms.
        ((now / 1_000_000) as u32).wrapping_sub(syn_tsval).max(1)
    };
    let port = alloc_port(key, vip, index, &backend, now, ts_off)?;
    let value = FlowValue {
        backend: index,
        snat_addr: vip.snat_addr,
        snat_port: port,
        flags: 0,
        _pad: 0,
        ts_off,
        last_seen_ns: now,
    };
    if FLOWS.insert(key, value, BPF_ANY as u64).is_err() {
        let _ = NAT_REVERSE.remove(reverse_key(&backend, vip.snat_addr, port));
        return Err(reason::DROP_FLOW_INSERT);
    }
    Ok(Decision {
        backend_index: index,
        backend,
        snat_addr: vip.snat_addr,
        snat_port: port,
        new_flow: true,
        ts_off,
    })
}

/// Marks FIN/RST on the flow's reverse entry, which decides when its port can be reused.
#[inline(always)]
fn mark_reverse(rkey: &FlowKey, flags: u8, now: u64) {
    if let Some(r) = NAT_REVERSE.get_ptr_mut(rkey) {
        unsafe {
            (*r).flags |= flags;
            (*r).last_seen_ns = now;
        }
    }
}

/// Decides where a client packet for `vip` goes: `syn` (without ACK) and `rst` describe the
/// packet, `close` the flow_flags it carries (FIN_CLIENT/RST), `syn_tsval` its timestamp.
#[inline(always)]
pub fn lookup_or_create(
    key: &FlowKey,
    vip: &VipInfo,
    syn: bool,
    rst: bool,
    close: u8,
    syn_tsval: u32,
) -> Result<Decision, u32> {
    let now = now();
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        let flow = unsafe { *f };
        if let Some(b) = BACKENDS.get(flow.backend) {
            let b = *b;
            let reused_tuple = syn && closed(flow.flags);
            if b.state != state::DOWN && b.state != state::UNUSED && !reused_tuple {
                if close != 0 || now.wrapping_sub(flow.last_seen_ns) > TOUCH_NS {
                    unsafe {
                        (*f).last_seen_ns = now;
                        (*f).flags |= close;
                    }
                }
                if close != 0 {
                    mark_reverse(&reverse_key(&b, flow.snat_addr, flow.snat_port), close, now);
                }
                return Ok(Decision {
                    backend_index: flow.backend,
                    backend: b,
                    snat_addr: flow.snat_addr,
                    snat_port: flow.snat_port,
                    new_flow: false,
                    ts_off: flow.ts_off,
                });
            }
            // Its backend is gone (or the client reuses a closed tuple): free the old
            // port and place the flow afresh; the new backend resets a mid-stream packet
            // and the client reconnects at once.
            let _ = NAT_REVERSE.remove(reverse_key(&b, flow.snat_addr, flow.snat_port));
            if !reused_tuple {
                crate::stats::reason(reason::FLOW_REPICKED);
            }
        }
        let _ = FLOWS.remove(key);
    }
    if rst {
        return Err(reason::DROP_RST_NO_FLOW);
    }
    // A flow placed afresh mid-stream (its backend died) keeps the client's timestamps:
    // the new backend resets it anyway.
    create(key, vip, now, if syn { syn_tsval } else { 0 })
}

/// Updates a reply's reverse entry (and on FIN/RST the forward one) and returns a copy.
#[inline(always)]
pub fn touch_reverse(r: *mut ReverseValue, close: u8) -> ReverseValue {
    let now = now();
    unsafe {
        if close != 0 || now.wrapping_sub((*r).last_seen_ns) > TOUCH_NS {
            (*r).last_seen_ns = now;
        }
        if close != 0 {
            (*r).flags |= close;
            let fk = forward_key(&*r);
            if let Some(f) = FLOWS.get_ptr_mut(fk) {
                (*f).flags |= close;
            }
        }
        *r
    }
}
