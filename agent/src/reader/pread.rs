//! pread read engine: one block at a time, for kernels or sandboxes without io_uring.

use super::ReadReq;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// Borrows `fd` as a File without taking ownership of it.
fn borrow(fd: RawFd) -> ManuallyDrop<File> {
    #[allow(unsafe_code)]
    // SAFETY: the caller keeps `fd` open for the call; ManuallyDrop never closes it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Reads from `r.done` up to `r.len`, stopping early only at end of file.
pub fn finish(fd: RawFd, r: &mut ReadReq) -> io::Result<()> {
    let f = borrow(fd);
    let buf = r.buf.as_mut_slice();
    while r.done < r.len {
        match f.read_at(&mut buf[r.done..r.len], r.offset + r.done as u64) {
            Ok(0) => break,
            Ok(n) => r.done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn read(fd: RawFd, reqs: &mut [ReadReq]) -> io::Result<()> {
    for r in reqs {
        r.done = 0;
        finish(fd, r)?;
    }
    Ok(())
}
