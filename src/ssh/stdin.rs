//! Local stdin, read on a dedicated thread and handed to async code in 64 KiB chunks.
//!
//! tokio's own stdin reads on the blocking pool and cannot be cancelled, so a finished session
//! would keep a read pending (and runtime shutdown waiting for a key). Here the thread waits
//! with `poll(2)` in short slices and checks a stop flag between them: once the [`StdinPump`]
//! is dropped the thread ends within ~100 ms and never swallows input meant for whatever runs
//! next. Each chunk is a fresh `Vec`, which russh turns into packets without copying.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

/// Size of one read from stdin.
pub(crate) const CHUNK: usize = 64 * 1024;
/// How long the thread waits in `poll` before checking whether it should stop.
const POLL_SLICE_MS: libc::c_int = 100;

/// The receiving end of the stdin thread. `recv` yields chunks until local EOF (`None`).
pub(crate) struct StdinPump {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl StdinPump {
    /// Starts reading file descriptor 0.
    pub(crate) fn start() -> std::io::Result<StdinPump> {
        // A few chunks in flight keeps the pipe busy without buffering much.
        let (tx, rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        std::thread::Builder::new()
            .name("ssh-stdin".into())
            .spawn(move || pump(libc::STDIN_FILENO, &tx, &thread_stop))?;
        Ok(StdinPump { rx, stop })
    }

    /// The next chunk; `None` at EOF (or after a read error, which is returned once before).
    pub(crate) async fn recv(&mut self) -> Option<std::io::Result<Vec<u8>>> {
        self.rx.recv().await
    }
}

impl Drop for StdinPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
    async fn dropping_the_receiver_stops_an_idle_thread() {
        let mut fds = [0; 2];
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (tx, rx) = mpsc::channel(4);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let read_fd = fds[0];
        let reader = std::thread::spawn(move || pump(read_fd, &tx, &thread_stop));
        drop(StdinPump { rx, stop });
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
