//! The embedded SSH client against a real OpenSSH sshd on 127.0.0.1: commands run exactly as
//! given with their streams kept apart, the pinned host key is enforced at once, a late sshd is
//! still reached, a ProxyCommand works, a wrong client key stops at once, and the interactive
//! shell (driven through a real PTY) sizes, resizes, records and restores the terminal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ephemeral_admin::ssh::{self, Captured, ConnectOptions, ExecIo, RemoteExit, SshError, Transport};
use russh::keys::ssh_key::{Algorithm, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};

use crate::support::sshd::Sshd;

fn new_key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
}

fn private_openssh(key: &PrivateKey) -> String {
    key.to_openssh(LineEnding::LF).unwrap().to_string()
}

fn public_line(key: &PrivateKey) -> String {
    key.public_key().to_openssh().unwrap()
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The stand-in box: an sshd with its own host key that authorizes `client`.
struct Target {
    sshd: Sshd,
    host: PrivateKey,
    client: PrivateKey,
}

impl Target {
    fn start() -> Target {
        let (host, client) = (new_key(), new_key());
        let sshd = Sshd::start(&private_openssh(&host), &public_line(&client));
        Target { sshd, host, client }
    }

    fn options(&self) -> ConnectOptions {
        options(Transport::Tcp { host: "127.0.0.1".into(), port: self.sshd.port }, &self.client, &self.host)
    }
}

fn options(transport: Transport, client: &PrivateKey, host: &PrivateKey) -> ConnectOptions {
    ConnectOptions {
        transport,
        user: Sshd::user(),
        client_key: client.clone(),
        host_key: host.public_key().clone(),
        also_accept: None,
        repinned: Default::default(),
        connect_timeout: Duration::from_secs(20),
        keepalive_interval: Duration::from_secs(15),
        keepalive_max: 4,
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Attempts reported through `on_attempt`.
#[derive(Default)]
struct Attempts(Mutex<Vec<(u32, String)>>);

impl Attempts {
    fn callback(&self) -> impl Fn(u32, &str) + Sync + '_ {
        |n, error: &str| self.0.lock().unwrap().push((n, error.to_string()))
    }

    fn list(&self) -> Vec<(u32, String)> {
        self.0.lock().unwrap().clone()
    }
}

async fn connect(opts: &ConnectOptions) -> ssh::Session {
    let attempts = Attempts::default();
    ssh::connect(opts, &attempts.callback()).await.unwrap_or_else(|e| panic!("connect failed: {e}"))
}

async fn run(session: &ssh::Session, words: &[&str], stdin: &[u8]) -> (RemoteExit, Captured) {
    let mut output = Captured::default();
    let exit = session
        .exec(&argv(words), ExecIo::Capture { stdin: stdin.to_vec(), output: &mut output })
        .await
        .unwrap_or_else(|e| panic!("exec {words:?} failed: {e:#}"));
    (exit, output)
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_each_command_exactly_with_separate_streams_and_stdin() {
    let target = Target::start();
    let session = connect(&target.options()).await;

    let (exit, out) = run(&session, &["echo", "hello"], b"").await;
    assert_eq!((exit, text(&out.stdout), text(&out.stderr)), (RemoteExit::Status(0), "hello\n", ""));

    let (exit, _) = run(&session, &["sh", "-c", "exit 7"], b"").await;
    assert_eq!(exit, RemoteExit::Status(7));
    assert_eq!(exit.exit_code(), 7);

    let (exit, out) = run(&session, &["sh", "-c", "echo to-out; echo to-err >&2; exit 3"], b"").await;
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("to-out\n", "to-err\n"));
    assert_eq!(exit, RemoteExit::Status(3));

    let (_, out) = run(&session, &["printf", "%s\\n", "a b", "it's", "$HOME", "", "*"], b"").await;
    assert_eq!(text(&out.stdout), "a b\nit's\n$HOME\n\n*\n");

    // 5 MiB through `cat`, byte for byte, with output drained while input is still going.
    let data: Vec<u8> =
        (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (exit, out) = tokio::time::timeout(Duration::from_secs(60), run(&session, &["cat"], &data))
        .await
        .expect("cat with 5 MiB stalled: input and output must flow at the same time");
    assert_eq!(exit, RemoteExit::Status(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat did not echo the 5 MiB back byte-exactly");

    let (exit, _) = run(&session, &["sh", "-c", "kill -TERM $$"], b"").await;
    assert_eq!(exit, RemoteExit::Signal { name: "TERM".into() });
    assert_eq!(exit.exit_code(), 143);

    session.close().await;
}

/// The connection dropping mid-command (here: the command kills its own sshd session process)
/// is `Lost`, exit code 255, not a hang and not a made-up status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_lost() {
    let target = Target::start();
    let session = connect(&target.options()).await;
    let script = r#"p=$$
while [ "$p" -gt 1 ]; do
  case "$(cat /proc/$p/comm)" in sshd|sshd-session) kill -9 "$p"; sleep 5; exit 0;; esac
  p=$(cut -d' ' -f4 /proc/$p/stat)
done
exit 99"#;
    let started = Instant::now();
    let (exit, _) = run(&session, &["sh", "-c", script], b"").await;
    assert_eq!(exit, RemoteExit::Lost, "sshd log:\n{}", target.sshd.log());
    assert_eq!(exit.exit_code(), 255);
    assert!(started.elapsed() < Duration::from_secs(4), "noticing the drop took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_host_key_stops_at_once() {
    let target = Target::start();
    let pinned = new_key(); // not the key sshd has
    let opts =
        options(Transport::Tcp { host: "127.0.0.1".into(), port: target.sshd.port }, &target.client, &pinned);
    let attempts = Attempts::default();
    let started = Instant::now();
    let error = ssh::connect(&opts, &attempts.callback()).await.err().expect("connect must fail");
    let took = started.elapsed();
    assert!(matches!(error, SshError::HostKeyMismatch { .. }), "{error:?}");
    let message = error.to_string();
    eprintln!("{message}");
    assert!(message.contains("host key mismatch: possible interception"), "{message}");
    assert!(message.contains(&fingerprint(pinned.public_key())), "{message}");
    assert!(message.contains(&fingerprint(target.host.public_key())), "{message}");
    assert!(!message.contains('\n'), "{message}");
    assert!(took < Duration::from_secs(5), "took {took:?}: it retried instead of stopping");
    assert!(attempts.list().is_empty(), "retried: {:?}", attempts.list());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_client_key_stops_at_once() {
    let target = Target::start();
    let stranger = new_key(); // not in authorized_keys
    let opts =
        options(Transport::Tcp { host: "127.0.0.1".into(), port: target.sshd.port }, &stranger, &target.host);
    let attempts = Attempts::default();
    let started = Instant::now();
    let error = ssh::connect(&opts, &attempts.callback()).await.err().expect("connect must fail");
    assert!(matches!(error, SshError::AuthRejected { .. }), "{error:?}");
    let message = error.to_string();
    eprintln!("{message}");
    assert!(message.contains("rejected") && message.contains(&Sshd::user()), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(attempts.list().is_empty(), "retried: {:?}", attempts.list());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_sshd_is_reached_soon_after_it_starts() {
    let (host, client) = (new_key(), new_key());
    let delay = Duration::from_secs(2);
    let sshd = Sshd::start_after(delay, &private_openssh(&host), &public_line(&client));
    let opts = options(Transport::Tcp { host: "127.0.0.1".into(), port: sshd.port }, &client, &host);
    let attempts = Attempts::default();
    let started = Instant::now();
    let session = ssh::connect(&opts, &attempts.callback()).await.unwrap_or_else(|e| panic!("{e}"));
    let connected = Instant::now();
    let list = attempts.list();
    assert!(list.len() > 1 && list.last().unwrap().0 > 1, "attempts: {list:?}");
    assert!(list.iter().all(|(_, why)| why.contains("refused")), "attempts: {list:?}");
    assert!(connected - started >= delay);
    // Polling stays tight: sshd is noticed within one backoff step (0.5 s) of accepting, plus
    // the handshake.
    let listening = sshd.listening_at().expect("the fixture saw sshd listen");
    let noticed = connected.saturating_duration_since(listening);
    eprintln!(
        "sshd spawned {:?} before we connected; listening {noticed:?} before",
        connected - sshd.spawned_at().unwrap()
    );
    assert!(noticed < Duration::from_millis(1000), "connected {noticed:?} after sshd started accepting");
    let (exit, out) = run(&session, &["echo", "late"], b"").await;
    assert_eq!((exit, text(&out.stdout)), (RemoteExit::Status(0), "late\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sshd_times_out_saying_how_long_and_why() {
    let (host, client) = (new_key(), new_key());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut opts = options(Transport::Tcp { host: "127.0.0.1".into(), port }, &client, &host);
    opts.connect_timeout = Duration::from_millis(1500);
    let attempts = Attempts::default();
    let started = Instant::now();
    let error = ssh::connect(&opts, &attempts.callback()).await.err().expect("nothing listens");
    let took = started.elapsed();
    assert!(matches!(error, SshError::TimedOut { .. }), "{error:?}");
    let message = error.to_string();
    eprintln!("{message}");
    assert!(message.contains("within 1.5s") && message.contains("refused"), "{message}");
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(4), "took {took:?}");
    assert!(attempts.list().len() >= 3, "{:?}", attempts.list());
}

/// A relay in stdlib-only Python: stdin/stdout <-> TCP to argv[1]:argv[2]; touches argv[3] once
/// connected (proof that the traffic went through it).
const RELAY: &str = r#"exec python3 -c 'import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
open(sys.argv[3], "w").close()
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    sys.stdout.buffer.write(d)
    sys.stdout.buffer.flush()
' %h %p"#;

fn relay_command(port: u16, marker: &std::path::Path) -> String {
    let template = format!("{RELAY} {}", marker.display());
    ssh::expand_proxy_command(&template, "127.0.0.1", port, "i-0123456789abcdef0", &Sshd::user())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_command_carries_the_connection() {
    let target = Target::start();
    let marker = target.sshd.dir.join("relay-used");
    let opts = options(
        Transport::ProxyCommand(relay_command(target.sshd.port, &marker)),
        &target.client,
        &target.host,
    );
    let session = connect(&opts).await;
    assert!(marker.exists(), "the relay was not used");
    let (exit, out) = run(&session, &["sh", "-c", "echo via proxy; cat"], b"and back").await;
    assert_eq!((exit, text(&out.stdout)), (RemoteExit::Status(0), "via proxy\nand back"));
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_command_that_exits_is_retried() {
    let (host, client) = (new_key(), new_key());
    let sshd = Sshd::start_after(Duration::from_millis(1500), &private_openssh(&host), &public_line(&client));
    let marker = sshd.dir.join("relay-used");
    let opts = options(Transport::ProxyCommand(relay_command(sshd.port, &marker)), &client, &host);
    let attempts = Attempts::default();
    let session = ssh::connect(&opts, &attempts.callback()).await.unwrap_or_else(|e| panic!("{e}"));
    let list = attempts.list();
    assert!(!list.is_empty(), "the relay cannot have connected before sshd started");
    assert!(list.iter().all(|(_, why)| why.contains("proxy command exited")), "{list:?}");
    assert!(list.iter().any(|(_, why)| why.contains("ConnectionRefusedError")), "{list:?}");
    let (exit, out) = run(&session, &["echo", "ok"], b"").await;
    assert_eq!((exit, text(&out.stdout)), (RemoteExit::Status(0), "ok\n"));
}

// ---------------------------------------------------------------------------------------------
// Real stdio and a real terminal. `ExecIo::Inherit` and `shell()` use the process's own fds 0-2
// (and raw mode on its terminal), which a test must not take over in the shared test process. So
// these tests start this test binary again, running only `child_process_entry` below, with its
// stdio redirected to files or to a PTY the test holds the master side of.
// ---------------------------------------------------------------------------------------------

/// The child's half of the tests below; passes at once unless started by one of them.
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var("EA_SSH_CHILD") else { return };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let dir = std::path::PathBuf::from(var("EA_SSH_DIR"));
    let client = PrivateKey::from_openssh(var("EA_SSH_CLIENT_KEY")).unwrap();
    let host = PublicKey::from_openssh(&var("EA_SSH_HOST_KEY")).unwrap();
    let opts = ConnectOptions {
        transport: Transport::Tcp { host: "127.0.0.1".into(), port: var("EA_SSH_PORT").parse().unwrap() },
        user: Sshd::user(),
        client_key: client,
        host_key: host,
        also_accept: None,
        repinned: Default::default(),
        connect_timeout: Duration::from_secs(20),
        keepalive_interval: Duration::from_secs(15),
        keepalive_max: 4,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let outcome = runtime.block_on(async {
        let session = ssh::connect(&opts, &|_, _| {}).await.unwrap_or_else(|e| panic!("{e}"));
        let shell_opts = ssh::ShellOptions {
            term: "xterm-256color".into(),
            command: None,
            record: Some(dir.join("session.cast")),
        };
        match mode.as_str() {
            "exec-cat" => format!(
                "{:?}",
                session.exec(&argv(&["sh", "-c", "cat; echo done >&2"]), ExecIo::Inherit).await
            ),
            "exec-no-stdin" => format!("{:?}", session.exec(&argv(&["echo", "hi"]), ExecIo::Inherit).await),
            "shell" => format!("{:?}", session.shell(shell_opts).await),
            "shell-cancelled" => {
                // What the product does on SIGTERM/SIGHUP: drop the shell future.
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
                tokio::select! {
                    result = session.shell(shell_opts) => format!("{result:?}"),
                    _ = term.recv() => "cancelled".to_string(),
                }
            }
            "shell-panic" => {
                let trigger = dir.join("panic-now");
                // The panic happens inside a future polled next to the shell's, so the shell
                // (and its raw-mode guard) is still alive when the panic hook runs.
                let bomb = async {
                    while !trigger.exists() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    panic!("deliberate panic during the shell");
                };
                tokio::select! {
                    result = session.shell(shell_opts) => format!("{result:?}"),
                    never = bomb => match never {},
                }
            }
            other => panic!("unknown child mode {other}"),
        }
    });
    std::fs::write(dir.join("result"), outcome).unwrap();
}

/// Starts `child_process_entry` in `mode` against `target`; the caller sets up its stdio.
fn child_command(mode: &str, target: &Target) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["ssh::child_process_entry", "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env("EA_SSH_CHILD", mode)
        .env("EA_SSH_DIR", &target.sshd.dir)
        .env("EA_SSH_PORT", target.sshd.port.to_string())
        .env("EA_SSH_CLIENT_KEY", private_openssh(&target.client))
        .env("EA_SSH_HOST_KEY", target.host.public_key().to_openssh().unwrap());
    cmd
}

/// A child process that is killed if the test ends (or fails) before it exits.
struct Spawned(std::process::Child);

impl Spawned {
    /// Waits for the child to exit, killing it after `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "the child did not finish within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn child_result(target: &Target) -> String {
    std::fs::read_to_string(target.sshd.dir.join("result")).unwrap_or_default()
}

#[test]
fn exec_with_inherited_stdio_pipes_stdin_through_and_keeps_streams_apart() {
    let target = Target::start();
    let dir = &target.sshd.dir;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    std::fs::write(dir.join("stdin"), &data).unwrap();
    let file = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut child = Spawned(
        child_command("exec-cat", &target)
            .stdin(std::fs::File::open(dir.join("stdin")).unwrap())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .unwrap(),
    );
    let status = child.wait(Duration::from_secs(60));
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(status.success(), "child failed: {status}\n{stderr}");
    assert_eq!(child_result(&target), "Ok(Status(0))");
    let stdout = std::fs::read(dir.join("stdout")).unwrap();
    // libtest's own chatter ("running 1 test" …) shares the file; the data sits in one piece.
    let at = stdout.windows(64).position(|w| w == &data[..64]).expect("the data never reached stdout");
    assert!(stdout[at..].starts_with(&data), "stdout does not hold the data byte-exactly");
    assert!(stderr.contains("done\n"), "remote stderr did not reach local stderr: {stderr}");
    assert!(!String::from_utf8_lossy(&stdout).contains("done\n"), "remote stderr leaked into stdout");
}

/// A command that never reads stdin ends the run even though local stdin stays open: nothing
/// waits for a key, neither the exec nor the process's exit.
#[test]
fn exec_with_inherited_stdio_does_not_wait_for_stdin() {
    let target = Target::start();
    let mut child = Spawned(
        child_command("exec-no-stdin", &target)
            .stdin(std::process::Stdio::piped()) // held open, never written
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let status = child.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert_eq!(child_result(&target), "Ok(Status(0))");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    drop(child.0.stdin.take());
}

/// A pseudo-terminal whose master side the test holds: it types, reads everything the child
/// writes, resizes the window, and inspects the terminal modes.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
    output: std::sync::Arc<Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pty {
    fn open(cols: u16, rows: u16) -> Pty {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: valid out-pointers; null name and termios ask for the defaults.
        let rc =
            unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just returned these descriptors; nothing else owns them.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let output = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = master.try_clone().unwrap();
        let (sink, done) = (output.clone(), stop.clone());
        std::thread::spawn(move || {
            let fd = reader.as_raw_fd();
            let mut buf = [0u8; 65536];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pollfd, 1, 50) } <= 0 {
                    continue;
                }
                // SAFETY: `buf` is valid for its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n as usize]);
            }
        });
        Pty { master, slave, output, stop }
    }

    /// Starts `cmd` as a session leader with this terminal as its controlling terminal and stdio.
    fn spawn(&self, mut cmd: std::process::Command) -> Spawned {
        use std::os::unix::process::CommandExt;
        let stdio = || std::process::Stdio::from(self.slave.try_clone().unwrap());
        cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Spawned(cmd.spawn().unwrap())
    }

    fn type_text(&self, text: &str) {
        use std::io::Write;
        let mut master = std::fs::File::from(self.master.try_clone().unwrap());
        master.write_all(text.as_bytes()).unwrap();
    }

    fn len(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    fn text_since(&self, offset: usize) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()[offset..]).into_owned()
    }

    /// Waits until `needle` appears after `offset`; panics with the transcript otherwise.
    fn wait_for(&self, needle: &str, offset: usize, limit: Duration) {
        let until = Instant::now() + limit;
        while !self.text_since(offset).contains(needle) {
            assert!(
                Instant::now() < until,
                "{needle:?} never appeared; terminal output:\n{}",
                self.text_since(0)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        use std::os::fd::AsRawFd;
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize.
        assert_eq!(unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) }, 0);
    }

    /// Whether the terminal is in canonical mode with echo, as a shell leaves it (not raw).
    fn is_cooked(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: a zeroed termios is a valid out-parameter.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `tio` is valid to fill in.
        assert_eq!(unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut tio) }, 0);
        tio.c_lflag & (libc::ICANON | libc::ECHO) == (libc::ICANON | libc::ECHO)
            && tio.c_oflag & libc::OPOST != 0
    }

    fn wait_raw(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.is_cooked() {
            assert!(Instant::now() < until, "the terminal never went raw; output:\n{}", self.text_since(0));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts the child's shell under a 100x30 PTY and waits until it is live (raw mode, remote
/// shell answering).
fn live_shell(mode: &str, target: &Target) -> (Pty, Spawned) {
    let pty = Pty::open(100, 30);
    assert!(pty.is_cooked());
    let child = pty.spawn(child_command(mode, target));
    pty.wait_raw(Duration::from_secs(20));
    let offset = pty.len();
    // The typed line holds `$((6*7))`; only the remote shell running it prints 42.
    pty.type_text("stty size; echo \"T=$TERM\"; echo M1-$((6*7))\r");
    pty.wait_for("M1-42", offset, Duration::from_secs(20));
    (pty, child)
}

#[test]
fn shell_in_a_pty_sizes_resizes_records_and_restores_the_terminal() {
    let target = Target::start();
    let (pty, mut child) = live_shell("shell", &target);
    let transcript = pty.text_since(0);
    assert!(transcript.contains("30 100"), "the remote PTY was not 100x30:\n{transcript}");
    assert!(transcript.contains("T=xterm-256color"), "{transcript}");

    pty.resize(120, 40);
    let mut resized = false;
    for _ in 0..40 {
        let offset = pty.len();
        pty.type_text("stty size; echo M2-$((6*8))\r");
        pty.wait_for("M2-48", offset, Duration::from_secs(10));
        if pty.text_since(offset).contains("40 120") {
            resized = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(resized, "the window change never reached the box:\n{}", pty.text_since(0));

    pty.type_text("exit 3\r");
    let status = child.wait(Duration::from_secs(20));
    assert!(status.success(), "child failed ({status}):\n{}", pty.text_since(0));
    assert_eq!(child_result(&target), "Ok(Status(3))");
    assert!(pty.is_cooked(), "the terminal was left raw");

    let cast_path = target.sshd.dir.join("session.cast");
    // What was typed and shown is the user's alone (issue #31).
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cast_path).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o600, "the recording is private");
    let cast = std::fs::read_to_string(&cast_path).unwrap();
    let lines: Vec<serde_json::Value> = cast.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        (lines[0]["version"].as_u64(), lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(2), Some(100), Some(30))
    );
    assert_eq!(lines[0]["env"]["TERM"], "xterm-256color");
    let events: Vec<(&str, &str)> =
        lines[1..].iter().map(|e| (e[1].as_str().unwrap(), e[2].as_str().unwrap())).collect();
    let output: String = events.iter().filter(|(kind, _)| *kind == "o").map(|(_, text)| *text).collect();
    assert!(output.contains("M1-42") && output.contains("30 100") && output.contains("40 120"), "{output}");
    assert!(events.contains(&("r", "120x40")), "no resize event: {events:?}");
}

/// The product cancels the shell future on SIGTERM/SIGHUP: dropping it must restore the terminal.
#[test]
fn shell_cancelled_by_a_signal_restores_the_terminal() {
    let target = Target::start();
    let (pty, mut child) = live_shell("shell-cancelled", &target);
    let offset = pty.len();
    // SAFETY: kill(2) on the child we started.
    assert_eq!(unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait(Duration::from_secs(20));
    assert!(status.success(), "child failed ({status}):\n{}", pty.text_since(0));
    assert_eq!(child_result(&target), "cancelled");
    assert!(pty.is_cooked(), "the terminal was left raw");
    // Cut short, so the screen modes a remote program may have set are reset (the reader thread
    // may still be draining the pty when the child has exited: wait for the bytes).
    pty.wait_for("\x1b[?25h", offset, Duration::from_secs(5));
}

/// A panic while the shell runs: the hook restores the terminal before the message is printed,
/// so the message's newlines already get their carriage returns back.
#[test]
fn shell_panic_restores_the_terminal_before_the_message() {
    let target = Target::start();
    let (pty, mut child) = live_shell("shell-panic", &target);
    std::fs::write(target.sshd.dir.join("panic-now"), "").unwrap();
    let status = child.wait(Duration::from_secs(20));
    assert!(!status.success(), "the child should have failed by panicking");
    pty.wait_for("deliberate panic during the shell", 0, Duration::from_secs(5));
    assert!(pty.is_cooked(), "the terminal was left raw");
    let transcript = pty.text_since(0);
    assert!(
        transcript.contains("deliberate panic during the shell\r\n"),
        "the panic message was printed in raw mode: {transcript:?}"
    );
}
