//! The client half of the resume protocol (`ephemeral_admin::ssh::resume`) against the real
//! box-side relay (`src/userdata/resume.py`, run with the test Python), over tunnels that are cut
//! every few hundred KiB in the middle of frames, in both directions: the stream above carries
//! every byte exactly once, in order, and ends when either end ends it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ephemeral_admin::ssh::resume::{self, Dial, Fault, Io};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::support::cloud::{python, repo};

/// The relay, listening on a free loopback port, in front of `to`.
struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Relay::start_on(port, to)
    }

    fn start_on(port: u16, to: u16) -> Relay {
        let child = Command::new(python())
            .arg(repo().join("src/userdata/resume.py"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--to", &format!("127.0.0.1:{to}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run resume.py");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "the relay never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Relay { child, port }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tunnel that ends after `budget` bytes in either direction: reads then see EOF (as after
/// the endpoint's close 1000) and writes fail, wherever a frame happens to be.
struct Cut {
    inner: TcpStream,
    left: usize,
}

impl AsyncRead for Cut {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > self.left {
            buf.set_filled(before + self.left);
        }
        self.left = self.left.saturating_sub(got);
        poll
    }
}

impl AsyncWrite for Cut {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.left);
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let std::task::Poll::Ready(Ok(written)) = &poll {
            self.left -= *written;
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Dials the relay through a [`Cut`] of `budget` bytes; counts the tunnels.
fn cutting_dial(port: u16, budget: usize, dialled: Arc<AtomicUsize>) -> Dial {
    Box::new(move || {
        let dialled = dialled.clone();
        Box::pin(async move {
            dialled.fetch_add(1, Ordering::SeqCst);
            let inner =
                TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| Fault::Retry(e.to_string()))?;
            Ok(Box::new(Cut { inner, left: budget }) as Box<dyn Io>)
        })
    })
}

fn payload(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_stream_through_the_relay_survives_tunnels_cut_mid_frame_both_ways() {
    runtime().block_on(async {
        // sshd's stand-in echoes what it gets.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = conn.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let relay = Relay::start(echo_port);
        let dialled = Arc::new(AtomicUsize::new(0));
        let stream = resume::open(cutting_dial(relay.port, 300_000, dialled.clone())).await.unwrap();
        let (mut r, mut w) = tokio::io::split(stream);
        let sent = payload(3 << 20, 7);
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(10_000) {
                w.write_all(chunk).await.unwrap();
            }
            w
        });
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(120), r.read_exact(&mut got)).await.unwrap().unwrap();
        assert!(got == expected, "every byte echoed once, in order");
        let mut w = writer.await.unwrap();
        assert!(dialled.load(Ordering::SeqCst) >= 10, "tunnels: {}", dialled.load(Ordering::SeqCst));
        // Our end closes: the relay closes sshd's side, and our reads end.
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty(), "{} stray bytes", rest.len());
    });
}

#[test]
fn sshd_closing_the_connection_ends_the_stream_after_its_last_byte() {
    runtime().block_on(async {
        // sshd's stand-in says 1 MiB and hangs up.
        let said = payload(1 << 20, 3);
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let speech = said.clone();
        tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            conn.write_all(&speech).await.unwrap();
        });
        let relay = Relay::start(port);
        let dialled = Arc::new(AtomicUsize::new(0));
        let mut stream = resume::open(cutting_dial(relay.port, 200_000, dialled.clone())).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut got)).await.unwrap().unwrap();
        assert!(got == said, "{} of {} bytes", got.len(), said.len());
        assert!(dialled.load(Ordering::SeqCst) >= 5, "tunnels: {}", dialled.load(Ordering::SeqCst));
    });
}

#[test]
fn a_relay_that_no_longer_knows_the_stream_ends_it_instead_of_starting_another() {
    runtime().block_on(async {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let mut relay = Relay::start(echo_port);
        let port = relay.port;
        let dialled = Arc::new(AtomicUsize::new(0));
        let mut stream = resume::open(cutting_dial(port, 1 << 30, dialled.clone())).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut five = [0u8; 5];
        stream.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");
        // The box's relay restarts (its sessions are gone); the tunnel ends with it.
        let _ = relay.child.kill();
        let _ = relay.child.wait();
        let _again = Relay::start_on(port, echo_port);
        // The stream may have ended already (the new relay refused the old token): a write then
        // fails, which is the point.
        let _ = stream.write_all(&[b'x'; 2_000]).await;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest)).await;
        assert!(end.is_ok(), "the stream ends");
        assert!(rest.is_empty(), "no new stream to sshd carried on: {} bytes came back", rest.len());
        assert!(dialled.load(Ordering::SeqCst) >= 2, "a new tunnel was tried");
    });
}
