//! Socket mode: cgroup hooks that connect a host's own sockets to a backend directly. A
//! connect() to a socket-mode VIP is made to the backend Maglev picks from the socket's
//! cookie, so the kernel connects the socket straight there and no packet of it is ever
//! rewritten; getpeername() then reports the VIP, so the client sees what it asked for.
//! Sockets already connected are never touched: the hook runs only on connect().

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{mode, reason, FlowKey, SockRevNat, VipKey, IPPROTO_TCP};

use crate::{flow, stats, AGENT_META, SOCK_REVNAT, VIPS};

/// Go on with the call (a cgroup sock_addr program's verdict).
const ALLOW: i32 = 1;
/// Fail the call (with the errno bpf_set_retval gave).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;

/// connect4: a TCP connect() to a socket-mode VIP goes to a backend, or fails at once with
/// ECONNREFUSED when none is up.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP as u32 {
        return ALLOW;
    }
    let key = VipKey {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let Some(vip) = (unsafe { VIPS.get(key) }) else {
        return ALLOW;
    };
    if vip.mode != mode::SOCKET {
        return ALLOW;
    }
    // The agent's network namespace only: elsewhere (a pod) 127.0.0.1 is another host's.
    if let Some(meta) = AGENT_META.get(0) {
        if meta.netns_cookie != 0
            && meta.netns_cookie != unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) }
        {
            stats::reason(reason::SOCK_OTHER_NETNS);
            return ALLOW;
        }
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // The cookie is unique per socket: one process's connections spread like any client's.
    let fkey = FlowKey::tcp(cookie as u32, (cookie >> 32) as u32, 0, key.port);
    let (index, backend) = match flow::pick(&fkey, vip) {
        Ok(p) => p,
        Err(_) => {
            stats::reason(reason::SOCK_REFUSED);
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
    };
    let rev = SockRevNat {
        vip_addr: key.addr,
        backend_addr: backend.addr,
        vip_port: key.port,
        backend_port: backend.port,
    };
    // Without room the socket still connects; only getpeername() then shows the backend.
    let _ = SOCK_REVNAT.insert(cookie, rev, 0);
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    stats::forward(vip.index, index, 0, true);
    stats::reason(reason::SOCK_CONNECT);
    ALLOW
}

/// getpeername4: a socket connect4 sent to a backend reports the VIP it asked for.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let Some(rev) = (unsafe { SOCK_REVNAT.get(cookie) }) else {
        return ALLOW;
    };
    if sa.user_ip4 == rev.backend_addr && sa.user_port as u16 == rev.backend_port {
        sa.user_ip4 = rev.vip_addr;
        sa.user_port = rev.vip_port as u32;
    }
    ALLOW
}
