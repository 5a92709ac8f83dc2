//! Merging an image's two mounts into one tree with overlayfs.
//!
//! The kernel decides per FUSE mount whether opens reach the filesystem: when they do, each
//! open and close of a small file is a round trip to this process; when they do not, no file
//! can be read by passthrough. Shoal therefore serves an image as two mounts, one of everything
//! but large files (opened without asking) and one of large files and the directories leading
//! to them (passthrough), and stacks a read-only overlayfs over them: the first holds every
//! directory and small file, so overlayfs finds those there; large files it finds in the second.
//!
//! Passthrough mounts count as one level of stacking and the kernel allows two, so this
//! overlayfs cannot itself be a lower layer of another overlayfs: a container runtime should
//! take the two mounts as lower layers of its own overlayfs instead (same order).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether this process can merge mounts with overlayfs: it runs as root and the kernel has
/// overlayfs.
pub fn available() -> bool {
    is_root() && std::fs::read_to_string("/proc/filesystems").is_ok_and(|list| list.lines().any(|line| line.ends_with("\toverlay")))
}

/// Whether this process runs as root (it may mount filesystems).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// Mounts a read-only overlayfs at `target` merging `lowers` (the first on top), named
/// `source` in the mount table.
pub fn mount(source: &str, lowers: &[&Path], target: &Path) -> io::Result<()> {
    let mut options = b"lowerdir=".to_vec();
    for (i, lower) in lowers.iter().enumerate() {
        if i > 0 {
            options.push(b':');
        }
        options.extend(escape(lower.as_os_str().as_bytes()));
    }
    // Directories are never renamed in an image: no redirect to look for on each lookup.
    options.extend_from_slice(b",redirect_dir=nofollow");
    mount_fs(source.as_bytes(), target, b"overlay", libc::MS_RDONLY | libc::MS_NOATIME, &options)
}

/// mount(2): mounts `source` of type `fstype` at `target` with `flags` and `options`.
pub(crate) fn mount_fs(source: &[u8], target: &Path, fstype: &[u8], flags: libc::c_ulong, options: &[u8]) -> io::Result<()> {
    let source = c_string(source)?;
    let target = c_string(target.as_os_str().as_bytes())?;
    let fstype = c_string(fstype)?;
    let options = c_string(options)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, options.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts `target` (any filesystem); when it is busy, detaches it so it goes once no longer used. Returns
/// whether it had to be detached.
pub fn unmount(target: &Path) -> io::Result<bool> {
    let target = c_string(target.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    #[allow(unsafe_code)]
    let umount = |flags| unsafe { libc::umount2(target.as_ptr(), flags) };
    if umount(0) == 0 {
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    if umount(libc::MNT_DETACH) == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The sysfs name of the filesystem `file` is on (`ext4/vda`, `erofs/erofs-27`), when the
/// kernel says (FS_IOC_GETFSSYSFSPATH, Linux 6.10+).
pub fn sysfs_name(file: &std::fs::File) -> Option<Vec<u8>> {
    /// `_IOR(0x15, 1, struct fs_sysfs_path)`: a length byte and 128 bytes of name.
    const FS_IOC_GETFSSYSFSPATH: libc::c_ulong = 0x8081_1501;
    let mut sysfs = [0u8; 129];
    // SAFETY: the kernel writes at most 129 bytes into the buffer, which outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(file), FS_IOC_GETFSSYSFSPATH, sysfs.as_mut_ptr()) };
    (rc == 0).then(|| sysfs[1..1 + usize::from(sysfs[0]).min(128)].to_vec())
}

/// A path as overlayfs's `lowerdir` option reads it: `\`, `:` and `,` escaped with `\`.
fn escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if matches!(b, b'\\' | b':' | b',') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a mount argument holds a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_separators_in_paths_are_escaped() {
        assert_eq!(escape(b"/var/lib/shoal/mounts/12/small"), b"/var/lib/shoal/mounts/12/small");
        assert_eq!(escape(b"/a:b,c\\d"), b"/a\\:b\\,c\\\\d");
    }
}
