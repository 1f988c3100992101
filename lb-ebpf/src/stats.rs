//! Per-CPU counters: no atomics needed, each CPU owns its slot.

use crate::{STATS_BACKEND, STATS_REASON, STATS_VIP};

#[inline(always)]
pub fn reason(r: u32) {
    if let Some(c) = STATS_REASON.get_ptr_mut(r) {
        unsafe { *c += 1 };
    }
    if lb_common::event::emits(r) {
        crate::events::note(r);
    }
}

/// Counts a packet from a client to a backend.
#[inline(always)]
pub fn forward(vip: u32, backend: u32, bytes: u64, new_flow: bool) {
    let n = new_flow as u64;
    if let Some(s) = STATS_VIP.get_ptr_mut(vip) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += n;
        }
    }
    if let Some(s) = STATS_BACKEND.get_ptr_mut(backend) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += n;
        }
    }
}

/// Counts a reply from a backend to a client.
#[inline(always)]
pub fn reply(vip: u32, backend: u32, bytes: u64) {
    if let Some(s) = STATS_VIP.get_ptr_mut(vip) {
        unsafe {
            (*s).reply_packets += 1;
            (*s).reply_bytes += bytes;
        }
    }
    if let Some(s) = STATS_BACKEND.get_ptr_mut(backend) {
        unsafe {
            (*s).reply_packets += 1;
            (*s).reply_bytes += bytes;
        }
    }
}
