//! The bpf(2) commands the data plane issues itself, through one wrapper: aya 0.14 has no
//! read-only BPF_OBJ_GET and no batch calls.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

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
