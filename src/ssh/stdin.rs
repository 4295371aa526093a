//! Local stdin, handed to async code in chunks of up to 64 KiB.
//!
//! tokio's own stdin reads on the blocking pool and cannot be cancelled, so a finished session
//! would keep a read pending (and runtime shutdown waiting for a key); every chunk would also
//! cross threads, which costs an echoed keystroke a wake-up. So:
//! - a terminal or a pipe is reopened through `/proc/self/fd/0` as a new, non-blocking open file
//!   description and read in the runtime's own event loop (no thread, no hand-off). Reopening
//!   matters: `O_NONBLOCK` set on the inherited descriptor would also hit the shell we share the
//!   terminal with, while a separate description keeps it to ourselves, and dropping it stops
//!   reading at once;
//! - anything else (a regular file, a socket, no `/proc`) is read on a dedicated thread that
//!   waits with `poll(2)` in short slices and checks a stop flag between them: once the
//!   [`StdinPump`] is dropped the thread ends within ~100 ms and never swallows input meant for
//!   whatever runs next.
//!
//! Each chunk is a fresh `Vec`, which russh turns into packets without copying.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Size of one read from stdin.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Reads up to this size (keystrokes) are handed on in a right-sized copy.
const SMALL: usize = 4096;
/// How long the thread waits in `poll` before checking whether it should stop.
const POLL_SLICE_MS: libc::c_int = 100;

/// Local stdin as a stream of chunks: `recv` yields them until local EOF (`None`).
pub(crate) enum StdinPump {
    /// A terminal or pipe, reopened non-blocking and read in the event loop.
    Polled { fd: AsyncFd<OwnedFd>, done: bool },
    /// Anything else, read by a thread.
    Thread { rx: mpsc::Receiver<std::io::Result<Vec<u8>>>, stop: Arc<AtomicBool> },
}

impl StdinPump {
    /// Starts reading file descriptor 0.
    pub(crate) fn start() -> std::io::Result<StdinPump> {
        match reopen_nonblocking(libc::STDIN_FILENO) {
            Some(fd) => Ok(StdinPump::Polled { fd, done: false }),
            None => StdinPump::thread(libc::STDIN_FILENO),
        }
    }

    fn thread(fd: libc::c_int) -> std::io::Result<StdinPump> {
        // A few chunks in flight keeps the pipe busy without buffering much.
        let (tx, rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        std::thread::Builder::new().name("ssh-stdin".into()).spawn(move || pump(fd, &tx, &thread_stop))?;
        Ok(StdinPump::Thread { rx, stop })
    }

    /// The next chunk; `None` at EOF (or after a read error, which is returned once before).
    pub(crate) async fn recv(&mut self) -> Option<std::io::Result<Vec<u8>>> {
        match self {
            StdinPump::Thread { rx, .. } => rx.recv().await,
            StdinPump::Polled { done: true, .. } => None,
            StdinPump::Polled { fd, done } => loop {
                let mut ready = match fd.readable().await {
                    Ok(ready) => ready,
                    Err(e) => {
                        *done = true;
                        return Some(Err(e));
                    }
                };
                // Read into spare capacity: a keystroke should not cost zeroing 64 KiB.
                let mut buf = Vec::with_capacity(CHUNK);
                match ready.try_io(|fd| read_into_spare(fd.as_raw_fd(), &mut buf)) {
                    Ok(Ok(0)) => {
                        *done = true;
                        return None;
                    }
                    Ok(Ok(n)) if n <= SMALL => return Some(Ok(buf[..n].to_vec())),
                    Ok(Ok(_)) => return Some(Ok(buf)),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(Err(e)) => {
                        *done = true;
                        return Some(Err(e));
                    }
                    Err(_would_block) => continue,
                }
            },
        }
    }
}

impl Drop for StdinPump {
    fn drop(&mut self) {
        if let StdinPump::Thread { stop, .. } = self {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// `fd` reopened as a new non-blocking open file description registered with the runtime, if
/// it is a terminal or a pipe (what epoll can wait on, and what reopening keeps the same).
fn reopen_nonblocking(fd: libc::c_int) -> Option<AsyncFd<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat fills the zeroed struct for a descriptor we only inspect.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return None;
    }
    let kind = stat.st_mode & libc::S_IFMT;
    if kind != libc::S_IFIFO && kind != libc::S_IFCHR {
        return None;
    }
    // A character device other than a terminal (/dev/null, /dev/zero) stays on the thread.
    // SAFETY: isatty only inspects the descriptor.
    if kind == libc::S_IFCHR && unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    let path = reopen_path(fd)?;
    // SAFETY: a valid C string; the returned descriptor (if any) is ours alone.
    let reopened = unsafe {
        libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
    };
    if reopened < 0 {
        return None;
    }
    // SAFETY: `reopened` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(reopened) };
    // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and the same until it drops.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
}

/// Reads into `buf`'s spare capacity and extends its length by what was read.
fn read_into_spare(fd: libc::c_int, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is valid for `spare.len()` writable bytes; read(2) initialises the first
    // `n` of them, and only those become part of the vector.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above; `n <= spare.len()`.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

fn pump(fd: libc::c_int, tx: &mpsc::Sender<std::io::Result<Vec<u8>>>, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::Relaxed) || tx.is_closed() {
            return;
        }
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, POLL_SLICE_MS) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let _ = tx.blocking_send(Err(err));
            return;
        }
        if ready == 0 || stop.load(Ordering::Relaxed) {
            continue;
        }
        let mut buf = vec![0u8; CHUNK];
        // SAFETY: `buf` is valid for `CHUNK` writable bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), CHUNK) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                _ => {
                    let _ = tx.blocking_send(Err(err));
                    return;
                }
            }
        }
        if n == 0 {
            return; // EOF: dropping `tx` tells the receiver.
        }
        buf.truncate(n as usize);
        if tx.blocking_send(Ok(buf)).is_err() {
            return;
        }
    }
}

/// Where the descriptor can be opened again as a file of its own: `/proc/self/fd/N` on Linux.
/// Elsewhere (macOS's `/dev/fd/N` only duplicates the descriptor, so O_NONBLOCK would reach the
/// user's terminal) there is none, and stdin is read on the thread.
#[cfg(target_os = "linux")]
fn reopen_path(fd: std::os::fd::RawFd) -> Option<std::ffi::CString> {
    std::ffi::CString::new(format!("/proc/self/fd/{fd}")).ok()
}

#[cfg(not(target_os = "linux"))]
fn reopen_path(_fd: std::os::fd::RawFd) -> Option<std::ffi::CString> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pump_reads_a_pipe_to_eof_in_large_chunks() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer_data = data.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            use std::os::fd::FromRawFd;
            // SAFETY: we own the write end and hand it to exactly one File.
            let mut file = unsafe { std::fs::File::from_raw_fd(write_fd) };
            file.write_all(&writer_data).unwrap();
        });
        let (tx, mut rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let reader = std::thread::spawn(move || pump(read_fd, &tx, &thread_stop));
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= CHUNK);
            got.extend_from_slice(&chunk);
        }
        writer.join().unwrap();
        reader.join().unwrap();
        // SAFETY: the read end is ours and no longer used.
        unsafe { libc::close(read_fd) };
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_pipe_is_read_in_the_event_loop_without_making_the_shared_descriptor_non_blocking() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let fd = reopen_nonblocking(read_fd).expect("a pipe can be reopened and polled");
        let mut pump = StdinPump::Polled { fd, done: false };
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let writer_data = data.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            use std::os::fd::FromRawFd;
            // SAFETY: we own the write end and hand it to exactly one File.
            let mut file = unsafe { std::fs::File::from_raw_fd(write_fd) };
            file.write_all(&writer_data).unwrap();
        });
        let mut got = Vec::new();
        while let Some(chunk) = pump.recv().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert!(pump.recv().await.is_none(), "EOF stays EOF");
        writer.join().unwrap();
        assert_eq!(got, data);
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(read_fd, libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the inherited description stays blocking");
        // SAFETY: ours, no longer used.
        unsafe { libc::close(read_fd) };
    }

    #[tokio::test]
    async fn files_and_dev_null_are_left_to_the_thread() {
        use std::os::fd::AsRawFd;
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(reopen_nonblocking(null.as_raw_fd()).is_none());
        let file = std::fs::File::open(env!("CARGO_MANIFEST_DIR").to_string() + "/Cargo.toml").unwrap();
        assert!(reopen_nonblocking(file.as_raw_fd()).is_none());
    }

    #[tokio::test]
    async fn dropping_the_receiver_stops_an_idle_thread() {
        let mut fds = [0; 2];
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (tx, rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let read_fd = fds[0];
        let reader = std::thread::spawn(move || pump(read_fd, &tx, &thread_stop));
        drop(StdinPump::Thread { rx, stop });
        let started = std::time::Instant::now();
        reader.join().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // SAFETY: both ends are ours.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
