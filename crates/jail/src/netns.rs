//! Fresh network namespaces made ahead of time.
//!
//! Every run gets a network namespace of its own with only loopback, up. Creating
//! one costs about a millisecond of kernel work (and tearing it down more, later),
//! so a background thread keeps a few ready: it `unshare`s into a new namespace,
//! brings `lo` up, keeps a file descriptor to it, and repeats. A run takes one and
//! its init joins it with `setns`; each namespace is used by exactly one run, then
//! dropped. When the pool is empty the run creates its own, as before.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use crate::child::IfReqFlags;

#[derive(Debug, Default)]
struct Shared {
    ready: Mutex<Vec<OwnedFd>>,
    wanted: Condvar,
}

#[derive(Debug)]
pub(crate) struct NetPool {
    shared: Arc<Shared>,
}

impl NetPool {
    /// Starts the thread that keeps `size` namespaces ready.
    pub(crate) fn start(size: usize) -> NetPool {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("sandgate-netns".into())
            .spawn(move || fill(&worker, size));
        if let Err(e) = spawned {
            eprintln!("sandgate-jail: no network namespace pool: {e}");
        }
        NetPool { shared }
    }

    /// A ready namespace, if there is one.
    pub(crate) fn take(&self) -> Option<OwnedFd> {
        let mut ready = self.shared.ready.lock().unwrap_or_else(|p| p.into_inner());
        let fd = ready.pop();
        self.shared.wanted.notify_one();
        fd
    }
}

/// The pool thread: this thread's own network namespace changes with every
/// namespace it makes; it does nothing else.
fn fill(shared: &Shared, size: usize) {
    loop {
        {
            let mut ready = shared.ready.lock().unwrap_or_else(|p| p.into_inner());
            while ready.len() >= size {
                ready = shared.wanted.wait(ready).unwrap_or_else(|p| p.into_inner());
            }
        }
        match make() {
            Ok(fd) => shared
                .ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(fd),
            Err(e) => {
                // Runs fall back to making their own namespace.
                eprintln!("sandgate-jail: network namespace pool stopped: {e}");
                return;
            }
        }
    }
}

fn make() -> io::Result<OwnedFd> {
    // SAFETY: unshare affects only this thread, which does nothing but this.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    loopback_up()?;
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a socket this function owns; two ioctls on a stack struct of the
    // kernel's `struct ifreq` layout.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock);
        let mut req = IfReqFlags::loopback();
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
