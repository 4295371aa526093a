//! A real OpenSSH sshd on 127.0.0.1 for the SSH client tests: our host key only, one authorized
//! key, public-key login as the current user, logging verbosely to a file. Optionally it starts
//! listening only after a delay, like a box whose sshd comes up late. Killed on drop.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    child: Option<Child>,
    /// When sshd was spawned (for the late-start variant, after its delay).
    spawned_at: Option<Instant>,
    /// When its port first accepted a connection (late-start variant only).
    listening_at: Option<Instant>,
    stopped: bool,
}

impl Sshd {
    /// Starts sshd and returns once its port accepts connections.
    pub fn start(host_key_openssh_private: &str, authorized_key_line: &str) -> Sshd {
        let mut last_log = String::new();
        // A port picked as free can be taken before sshd binds it: try a few.
        for _ in 0..3 {
            let sshd = Sshd::prepare(host_key_openssh_private, authorized_key_line);
            sshd.spawn_now();
            match sshd.wait_accepting(Duration::from_secs(10)) {
                Ok(()) => return sshd,
                Err(log) => last_log = log,
            }
        }
        panic!("sshd did not start listening; its log:\n{last_log}");
    }

    /// Returns at once; sshd is spawned only after `delay` (the port refuses until then).
    pub fn start_after(delay: Duration, host_key_openssh_private: &str, authorized_key_line: &str) -> Sshd {
        let sshd = Sshd::prepare(host_key_openssh_private, authorized_key_line);
        let state = sshd.state.clone();
        let (dir, port) = (sshd.dir.clone(), sshd.port);
        // Not joined on drop: once `stopped` is set the thread wakes up to nothing to do.
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                if state.stopped {
                    return;
                }
                state.child = Some(spawn_sshd(&dir, port));
                state.spawned_at = Some(Instant::now());
            }
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    state.lock().unwrap_or_else(|p| p.into_inner()).listening_at = Some(Instant::now());
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        sshd
    }

    /// The login name the fixture authorizes (the current user).
    pub fn user() -> String {
        let out = Command::new("id").arg("-un").output().expect("running id -un");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// When sshd was spawned, once it has been.
    pub fn spawned_at(&self) -> Option<Instant> {
        self.state.lock().unwrap().spawned_at
    }

    /// For [`Sshd::start_after`]: when the port first accepted a connection (probed every 5 ms).
    pub fn listening_at(&self) -> Option<Instant> {
        self.state.lock().unwrap().listening_at
    }

    fn prepare(host_key: &str, authorized_key_line: &str) -> Sshd {
        let dir = std::env::temp_dir().join(format!(
            "ea-sshd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_private(&dir.join("host_key"), host_key);
        std::fs::write(dir.join("authorized_keys"), format!("{}\n", authorized_key_line.trim())).unwrap();
        // An empty home for the login: this machine's own ~/.bashrc stays out of the sessions.
        std::fs::create_dir_all(dir.join("home")).unwrap();
        let port = free_port();
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile none\n\
             UseDNS no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             LogLevel VERBOSE\n\
             SetEnv HOME={dir}/home\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        // sshd's privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        Sshd { port, dir, state: Arc::default() }
    }

    fn spawn_now(&self) {
        let mut state = self.state.lock().unwrap();
        state.child = Some(spawn_sshd(&self.dir, self.port));
        state.spawned_at = Some(Instant::now());
    }

    /// Waits for the port to accept; on failure returns sshd's log.
    fn wait_accepting(&self, limit: Duration) -> Result<(), String> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.state.lock().unwrap().child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("sshd exited ({status})\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("port {} never accepted\n{}", self.port, self.log()))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let child = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.stopped = true;
            state.child.take()
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("sshd fixture kept for inspection: {}\n{}", self.dir.display(), self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn_sshd(dir: &Path, port: u16) -> Child {
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {SSHD} (port {port}): {e}"))
}

fn write_private(path: &Path, text: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
