//! The bpf(2) commands the data plane issues itself, through one wrapper: aya 0.14 has no
//! read-only BPF_OBJ_GET, no batch calls, and keeps the fd of the XDP links it creates to
//! itself (and may fall back to a netlink attachment that cannot be pinned), so the pinned
//! link is created, pinned, updated and detached here.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type`'s BPF_XDP.
const BPF_XDP: u32 = 37;
/// `enum bpf_link_type`'s BPF_LINK_TYPE_CGROUP.
pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `enum bpf_link_type`'s BPF_LINK_TYPE_XDP.
pub(crate) const BPF_LINK_TYPE_XDP: u32 = 6;
/// XDP_FLAGS_SKB_MODE: generic mode.
pub(crate) const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// XDP_FLAGS_DRV_MODE: native mode.
pub(crate) const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// BPF_F_RDONLY: a map fd that can only be read, for which read access to the pin suffices.
pub(crate) const BPF_F_RDONLY: u32 = 1 << 3;

/// Issues bpf(2) command `cmd`; returns what the kernel returned (an fd for some commands).
///
/// # Safety
/// `attr` must be the `union bpf_attr` member of `cmd`, without uninitialised bytes (the
/// kernel refuses non-zero bytes past the fields it knows), and every pointer in it must be
/// valid for what the kernel reads or writes there.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<i64> {
    // SAFETY: the caller's contract.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of the fd a bpf(2) command returned.
fn owned(rc: i64) -> OwnedFd {
    // SAFETY: a fresh fd the kernel just returned to us and no one else holds.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// `union bpf_attr`'s `BPF_OBJ_*` member.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Opens the object pinned at `path` (BPF_OBJ_GET) with `file_flags` (0 or BPF_F_RDONLY).
pub(crate) fn obj_get(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the path outlives the call.
    unsafe { bpf(BPF_OBJ_GET, &mut attr) }.map(owned)
}

/// Pins `fd` at `path` (BPF_OBJ_PIN).
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the path outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// `union bpf_attr`'s `link_create` member, as far as XDP uses it.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches `prog` to interface `ifindex` with a new bpf_link (`flags`: XDP_FLAGS_*_MODE).
pub(crate) fn xdp_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    // SAFETY: no pointers.
    unsafe { bpf(BPF_LINK_CREATE, &mut attr) }.map(owned)
}

/// BPF_CGROUP_INET4_CONNECT, the attach type of a cgroup connect4 program.
pub(crate) const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// BPF_CGROUP_INET4_GETPEERNAME.
pub(crate) const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// Attaches `prog` to the cgroup open as `cgroup` with a new bpf_link of `attach_type`.
pub(crate) fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // target_fd shares target_ifindex's place in the union.
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    // SAFETY: no pointers.
    unsafe { bpf(BPF_LINK_CREATE, &mut attr) }.map(owned)
}

/// `union bpf_attr`'s `link_update` member.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes `link` run `prog` instead of its program, in one step (BPF_LINK_UPDATE).
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Detaches `link` from its interface, however many fds and pins still hold it
/// (BPF_LINK_DETACH).
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: no pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// The head of `struct bpf_link_info` and its `xdp` member.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    /// `enum bpf_link_type`.
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// The union after `prog_id` holds u64s, so it starts at offset 16.
    _pad: u32,
    /// For an XDP link: its interface; 0 once the interface is gone or the link detached.
    pub ifindex: u32,
    _pad2: u32,
}

/// `union bpf_attr`'s `info` member.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What the kernel says of `link` (BPF_OBJ_GET_INFO_BY_FD).
pub(crate) fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: info outlives the call and is info_len bytes long; the kernel writes at most
    // that many.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// `union bpf_attr`'s member for BPF_MAP_*_ELEM.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Element `key` of a plain array map whose values are `value_size` bytes: for a map whose
/// value type may not be this agent's.
pub(crate) fn array_lookup(map: BorrowedFd<'_>, key: u32, value_size: u32) -> io::Result<Vec<u8>> {
    let mut value = vec![0u8; value_size as usize];
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: key and value outlive the call; value holds one element of a map that is not
    // per-CPU.
    unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }?;
    Ok(value)
}
