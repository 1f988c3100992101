//! VRRP's raw IP sockets (protocol 112): one to receive every advert on the interface, one
//! bound to our address to send. Non-blocking; the receive side is awaited through AsyncFd.

use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use super::packet::{VRRP_MCAST, VRRP_PROTO, VRRP_TTL};

fn setsockopt<T>(fd: i32, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: `v` is a valid T for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn raw_socket(ifname: &str) -> io::Result<OwnedFd> {
    let owned = crate::sock::socket(
        libc::AF_INET,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        VRRP_PROTO as i32,
    )?;
    let fd = owned.as_raw_fd();
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: the name buffer outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const libc::c_void,
            name.as_bytes_with_nul().len() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// A `sockaddr_in` for `addr`, port 0.
pub fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn mreqn(group: Ipv4Addr, ifindex: u32) -> libc::ip_mreqn {
    libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from(group).to_be(),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: ifindex as i32,
    }
}

/// The sending socket: bound to `primary` on `ifname`, TTL 255 (receivers check it), no
/// multicast loop back.
pub struct Sender {
    fd: OwnedFd,
}

impl Sender {
    /// Opens the socket adverts leave through.
    pub fn open(ifname: &str, ifindex: u32, primary: Ipv4Addr) -> io::Result<Self> {
        let send = raw_socket(ifname)?;
        let fd = send.as_raw_fd();
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &(VRRP_TTL as i32))?;
        setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_TTL,
            &(VRRP_TTL as i32),
        )?;
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &0i32)?;
        setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &mreqn(Ipv4Addr::UNSPECIFIED, ifindex),
        )?;
        // Internetwork control, as keepalived sends.
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TOS, &0xc0i32)?;
        let sa = sockaddr(primary);
        // SAFETY: sa is a valid sockaddr_in.
        let rc = unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd: send })
    }

    /// Sends one VRRP payload (the kernel adds the IP header) to `dst`.
    pub fn send(&self, payload: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let sa = sockaddr(dst);
        // SAFETY: payload and sa outlive the call.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr() as *const libc::c_void,
                payload.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The receiving socket: unbound (a bound raw socket only sees packets for its address, and
/// multicast adverts are for 224.0.0.18), joined to the VRRP group when multicast.
pub struct Receiver {
    fd: AsyncFd<OwnedFd>,
}

impl Receiver {
    /// Opens the socket adverts arrive on; must be called inside a tokio runtime.
    pub fn open(ifname: &str, ifindex: u32, multicast: bool) -> io::Result<Self> {
        let recv = raw_socket(ifname)?;
        if multicast {
            setsockopt(
                recv.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_ADD_MEMBERSHIP,
                &mreqn(VRRP_MCAST, ifindex),
            )?;
        }
        // SAFETY: `recv` is an owned, open socket that the AsyncFd owns from now on.
        let fd = unsafe { AsyncFd::register(recv) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits until packets are queued, then hands each (IP header included) to `f`.
    pub async fn recv_all(&self, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        let mut buf = [0u8; 2048];
        while let Some(n) = crate::sock::recv_now(self.fd.get_ref(), &mut buf)? {
            f(&buf[..n]);
        }
        guard.clear_ready();
        Ok(())
    }
}
