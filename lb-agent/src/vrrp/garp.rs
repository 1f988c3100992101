//! Gratuitous ARP: a broadcast ARP request for a virtual address from that address, so
//! switches and neighbours learn that it now lives at our MAC. One packet socket, opened once.

use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// An AF_PACKET socket for gratuitous ARPs out of one interface.
pub struct Garp {
    fd: OwnedFd,
    ifindex: u32,
    mac: [u8; 6],
}

impl Garp {
    /// Opens the socket (needs CAP_NET_RAW).
    pub fn open(ifindex: u32, mac: [u8; 6]) -> io::Result<Self> {
        // SAFETY: socket(2); ownership passes to OwnedFd at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                // Protocol 0: send only, never receive (no frames queue up unread).
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, ifindex, mac })
    }

    /// The frame announcing `addr` at our MAC.
    pub fn frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
        let mut f = [0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        // Ethernet, IPv4, hlen 6, plen 4, request.
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&addr.octets());
        f[32..38].copy_from_slice(&[0xff; 6]);
        f[38..42].copy_from_slice(&addr.octets());
        f
    }

    /// Sends `count` gratuitous ARPs for `addr`.
    pub fn send(&self, addr: Ipv4Addr, count: u32) -> io::Result<()> {
        let frame = Self::frame(self.mac, addr);
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sa.sll_ifindex = self.ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for _ in 0..count {
            // SAFETY: frame and sa outlive the call.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &sa as *const _ as *const libc::sockaddr,
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_a_broadcast_request_for_the_address_from_itself() {
        let mac = [2, 0, 0xc6, 0x12, 0, 2];
        let f = Garp::frame(mac, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "ARP request");
        assert_eq!(&f[28..32], &[198, 18, 0, 100], "sender address");
        assert_eq!(&f[38..42], &[198, 18, 0, 100], "target address");
    }
}
