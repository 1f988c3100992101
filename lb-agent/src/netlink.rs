//! rtnetlink for the virtual addresses VRRP moves (add, delete, list) and gratuitous ARP.
//! Raw sockets through libc: a few messages do not need a netlink library.

use std::{io, mem::size_of, net::Ipv4Addr};

const NLMSG_HDR: usize = 16;
const IFADDRMSG: usize = 8;
const RTA_HDR: usize = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

struct Netlink {
    fd: i32,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned by Netlink and closed on drop.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Self { fd, seq: 1 })
    }

    fn send(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq += 1;
        let len = NLMSG_HDR + body.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        buf.extend_from_slice(&self.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(body);
        // SAFETY: sockaddr_nl zeroed = the kernel; buf outlives the call.
        let rc = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads messages for `seq` until the ACK/DONE; calls `f` on each payload.
    fn recv(&mut self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + NLMSG_HDR <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
                if len < NLMSG_HDR || off + len > n {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let payload = &buf[off + NLMSG_HDR..off + len];
                if mseq == seq {
                    match ty as i32 {
                        libc::NLMSG_ERROR => {
                            let code = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                            return if code == 0 {
                                Ok(())
                            } else {
                                Err(io::Error::from_raw_os_error(-code))
                            };
                        }
                        libc::NLMSG_DONE => return Ok(()),
                        _ => f(ty, payload),
                    }
                }
                off += align4(len);
            }
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
    }
}

fn addr_body(ifindex: u32, addr: Ipv4Addr, prefix: u8) -> Vec<u8> {
    // struct ifaddrmsg { family, prefixlen, flags, scope, index }
    let mut b = vec![libc::AF_INET as u8, prefix, 0, 0];
    b.extend_from_slice(&ifindex.to_ne_bytes());
    for ty in [IFA_LOCAL, IFA_ADDRESS] {
        b.extend_from_slice(&((RTA_HDR + 4) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&addr.octets());
    }
    b
}

/// Adds `addr/prefix` to the interface; an address already there is fine.
pub fn add_addr(ifindex: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    let flags = (libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    let seq = nl.send(libc::RTM_NEWADDR, flags, &addr_body(ifindex, addr, prefix))?;
    nl.recv(seq, |_, _| {})
}

/// Removes `addr/prefix` from the interface; an address not there is fine.
pub fn del_addr(ifindex: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    let seq = nl.send(
        libc::RTM_DELADDR,
        libc::NLM_F_ACK as u16,
        &addr_body(ifindex, addr, prefix),
    )?;
    match nl.recv(seq, |_, _| {}) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        r => r,
    }
}

/// The IPv4 addresses on the interface, with their prefix lengths.
pub fn list_addrs(ifindex: u32) -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let mut nl = Netlink::open()?;
    let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
    body.extend_from_slice(&0u32.to_ne_bytes());
    let seq = nl.send(libc::RTM_GETADDR, libc::NLM_F_DUMP as u16, &body)?;
    let mut out = Vec::new();
    nl.recv(seq, |ty, p| {
        if ty != libc::RTM_NEWADDR || p.len() < IFADDRMSG {
            return;
        }
        let prefix = p[1];
        let idx = u32::from_ne_bytes(p[4..8].try_into().unwrap());
        if idx != ifindex {
            return;
        }
        let mut off = IFADDRMSG;
        while off + RTA_HDR <= p.len() {
            let len = u16::from_ne_bytes(p[off..off + 2].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(p[off + 2..off + 4].try_into().unwrap());
            if len < RTA_HDR || off + len > p.len() {
                break;
            }
            if ty == IFA_LOCAL && len == RTA_HDR + 4 {
                let a = &p[off + 4..off + 8];
                out.push((Ipv4Addr::new(a[0], a[1], a[2], a[3]), prefix));
            }
            off += align4(len);
        }
    })?;
    Ok(out)
}

/// The interface's MAC address and whether it is up and running.
pub fn link_info(name: &str) -> io::Result<([u8; 6], bool)> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let mut mac = None;
    let mut running = false;
    for a in addrs {
        if a.interface_name != name {
            continue;
        }
        running = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_RUNNING)
            && a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        if let Some(ll) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
            if let Some(m) = ll.addr() {
                mac = Some(m);
            }
        }
    }
    mac.map(|m| (m, running))
        .ok_or_else(|| io::Error::other(format!("interface {name}: no link-layer address")))
}

/// Sends one gratuitous ARP (a broadcast request for `addr` from `addr`) out of `ifindex`.
pub fn send_garp(ifindex: u32, mac: [u8; 6], addr: Ipv4Addr) -> io::Result<()> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&addr.octets());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&addr.octets());
    // SAFETY: AF_PACKET socket, closed below; sockaddr_ll filled for the interface.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ARP as u16).to_be() as i32,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let rc = libc::sendto(
            fd,
            f.as_ptr() as *const libc::c_void,
            f.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

const IFLA_XDP: u16 = 43;
const IFLA_XDP_PROG_ID: u16 = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

fn attrs(mut p: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if p.len() < RTA_HDR {
            return None;
        }
        let len = u16::from_ne_bytes([p[0], p[1]]) as usize;
        let ty = u16::from_ne_bytes([p[2], p[3]]) & NLA_TYPE_MASK;
        if len < RTA_HDR || len > p.len() {
            return None;
        }
        let value = &p[RTA_HDR..len];
        p = &p[align4(len).min(p.len())..];
        Some((ty, value))
    })
}

/// The id of the XDP program attached to the interface (None: nothing attached).
pub fn xdp_prog_id(ifindex: u32) -> io::Result<Option<u32>> {
    let mut nl = Netlink::open()?;
    // struct ifinfomsg { family, pad, type, index, flags, change }
    let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    let seq = nl.send(libc::RTM_GETLINK, libc::NLM_F_ACK as u16, &body)?;
    let mut id = None;
    let res = nl.recv(seq, |ty, p| {
        if ty != libc::RTM_NEWLINK || p.len() < 16 {
            return;
        }
        for (t, v) in attrs(&p[16..]) {
            if t == IFLA_XDP {
                for (t2, v2) in attrs(v) {
                    if t2 == IFLA_XDP_PROG_ID && v2.len() >= 4 {
                        let pid = u32::from_ne_bytes(v2[..4].try_into().unwrap());
                        if pid != 0 {
                            id = Some(pid);
                        }
                    }
                }
            }
        }
    });
    // GETLINK answers with the link and no ACK when it succeeds; a read timeout after the
    // answer is fine.
    match res {
        Ok(()) => Ok(id),
        Err(e) if id.is_some() || e.kind() == io::ErrorKind::WouldBlock => Ok(id),
        Err(e) => Err(e),
    }
}
