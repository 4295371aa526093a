//! The whole product: `launch` → embedded SSH (pinned host key) → command or shell → teardown,
//! against moto, the box simulator and its real sshd, reached through the `box-connect` proxy
//! command the way a user would use `--proxy-command`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lifecycle::{login, wait_until};
use crate::support::{LocalCloud, User};

/// `--proxy-command` that reaches the box simulator's sshd for the instance (`%i`).
pub fn proxy(cloud: &LocalCloud) -> String {
    let script = crate::support::cloud::repo().join("tests/support/localcloud/box-connect");
    // The venv's interpreter, without site: starting it is what each connection attempt costs.
    format!("{} -S {} {} %i", crate::support::cloud::python().display(), script.display(), cloud.url)
}

pub fn attached_args<'a>(cloud_proxy: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["launch", "--my-ip", "203.0.113.7", "--user", login(), "--proxy-command", cloud_proxy];
    args.extend_from_slice(extra);
    args
}

/// A detached Session Manager box: `{session_id, instance_id}`. Every launch connects once (the
/// box makes its own host key) and the local cloud has no Session Manager to connect through, so
/// the launch is killed just before that connection, with the box, its group and its record made.
pub fn ssm_box(cloud: &LocalCloud, user: &User) -> Value {
    let killed = user
        .command(&["launch", "--detach", "--connect", "ssm"])
        .env("EPHEMERAL_ADMIN_ABORT_AFTER", "connecting")
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), None, "killed: {}", String::from_utf8_lossy(&killed.stderr));
    let state = cloud.state();
    let box_ =
        state["instances"].as_array().unwrap().iter().rev().find(|i| i["state"] != "terminated").unwrap();
    serde_json::json!({"session_id": box_["tags"]["ephemeral-admin:session"], "instance_id": box_["id"]})
}

/// `launch --detach --output json` through the box simulator's proxy; returns the session.
pub fn launch_detached(user: &User, proxy: &str, extra: &[&str]) -> Value {
    let args = attached_args(proxy, &[&["--detach", "--output", "json"][..], extra].concat());
    user.run(&args).success().json()
}

/// Nothing of any session is left in moto: instances, rules, alarms, open spot requests,
/// schedules.
pub fn assert_nothing_left(cloud: &LocalCloud) {
    let state = cloud.state();
    let live: Vec<&Value> =
        state["instances"].as_array().unwrap().iter().filter(|i| i["state"] != "terminated").collect();
    assert!(live.is_empty(), "live instances: {live:#?}");
    let groups = crate::launch::own_groups(&state);
    assert!(groups.is_empty(), "security groups (and their rules) left: {groups:#?}");
    assert!(state["alarms"].as_array().unwrap().is_empty(), "alarms left: {:#}", state["alarms"]);
    let open: Vec<&Value> = state["spot_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| matches!(s["state"].as_str(), Some("open" | "active")))
        .collect();
    assert!(open.is_empty(), "spot requests left: {open:#?}");
    let schedules = state["schedules"].as_array().unwrap();
    assert!(schedules.is_empty(), "schedules left: {schedules:#?}");
}

fn key_files(user: &User) -> Vec<std::path::PathBuf> {
    let Ok(dirs) = std::fs::read_dir(user.state_dir().join("sessions")) else { return Vec::new() };
    dirs.flatten().map(|d| d.path().join("id_ed25519")).filter(|p| p.exists()).collect()
}

#[test]
fn launch_runs_a_command_passes_its_status_through_and_tears_everything_down() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let run = user.run(&attached_args(&proxy, &["--", "echo", "hello"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "hello\n", "only the remote's output on stdout");
    assert!(run.stderr.contains("terminated i-") && run.stderr.contains("closed SSH"), "{}", run.stderr);
    assert_nothing_left(&cloud);
    assert!(key_files(&user).is_empty(), "the private key is deleted");

    // Arguments arrive exactly as typed, and the remote status is ours.
    let run = user.run(&attached_args(&proxy, &["--", "sh", "-c", "echo 'it'\"'\"'s here' >&2; exit 7"]));
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("it's here"), "stderr stays stderr: {}", run.stderr);
    assert!(run.stdout.is_empty());
    assert_nothing_left(&cloud);
}

/// The default route, with no proxy command: TCP straight to the instance's public IP (the box
/// simulator's sshd listens on it: localcloud hands out loopback addresses as public IPs).
#[test]
fn launch_connect_and_ssh_config_reach_the_box_at_its_public_ip() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let port = cloud.box_ssh_port.expect("the box simulator names its SSH port").to_string();
    let base = ["launch", "--my-ip", "203.0.113.7", "--user", login()];
    let run = user.run(&[&base[..], &["--", "sh", "-c", "echo \"$SSH_CONNECTION\"; exit 3"]].concat());
    assert_eq!(run.code, 3, "{}", run.stderr);
    let fields: Vec<&str> = run.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "SSH_CONNECTION is 'client port server port': {:?}", run.stdout);
    // The address EC2 reported (printed while waiting) is the one sshd saw the connection on.
    assert!(fields[2].starts_with("127.") && fields[2] != "127.0.0.1", "the box's own address: {fields:?}");
    assert_eq!(fields[3], port);
    assert!(run.stderr.contains(&format!("waiting for ssh on {}:{port}", fields[2])), "{}", run.stderr);
    assert_nothing_left(&cloud);

    // A detached session: `connect` and the user's own OpenSSH through `ssh-config`, both direct.
    let out = user.run(&[&base[..], &["--detach", "--output", "json"]].concat()).success().json();
    let session = out["session_id"].as_str().unwrap();
    let run = user.run(&["connect", session, "--", "sh", "-c", "echo \"${SSH_CONNECTION##* }\""]).success();
    assert_eq!(run.stdout.trim(), port);
    let config = user.run(&["ssh-config", session]).success().stdout;
    assert!(!config.contains("ProxyCommand"), "{config}");
    assert!(config.contains(&format!("    Port {port}\n")), "{config}");
    let config_path = user.home.join("ssh_config");
    std::fs::write(&config_path, &config).unwrap();
    let host = format!("ephemeral-admin-{session}");
    let ssh = Command::new("ssh")
        .args(["-F", config_path.to_str().unwrap(), "-o", "BatchMode=yes", &host, "echo openssh-direct"])
        .output()
        .unwrap();
    assert!(ssh.status.success(), "{}", String::from_utf8_lossy(&ssh.stderr));
    assert_eq!(String::from_utf8_lossy(&ssh.stdout), "openssh-direct\n");
    user.run(&["terminate", session]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn an_sshd_that_comes_up_late_is_still_reached() {
    let cloud = LocalCloud::start();
    cloud.control("PUT", "box-config", Some(json!({ "boot_seconds": 3 })));
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let started = Instant::now();
    let run = user.run(&attached_args(&proxy, &["--", "echo", "booted"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "booted\n");
    assert!(started.elapsed() >= Duration::from_secs(3), "it really waited for the boot");
    assert_nothing_left(&cloud);
}

/// A real box drops SYNs until its network is up, then refuses until sshd listens: the CLI keeps
/// fresh connects going beside the unanswered ones and gets in once sshd accepts.
#[test]
fn a_box_that_drops_syns_while_booting_is_reached_directly() {
    let cloud = LocalCloud::start();
    cloud.control("PUT", "box-config", Some(json!({ "boot_seconds": 2, "drop_syns_while_booting": true })));
    let user = User::new(&cloud);
    let run =
        user.run(&["launch", "--my-ip", "203.0.113.7", "--user", login(), "-v", "--", "echo", "booted"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "booted\n");
    let instance = cloud.state()["instances"][0]["id"].as_str().unwrap().to_string();
    let info = cloud.control("GET", &format!("box/{instance}"), None);
    let log: Vec<&str> = info["sshd_log"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(log.iter().filter(|l| l.starts_with("Accepted publickey")).count(), 1, "{log:#?}");
    assert_nothing_left(&cloud);
}

#[test]
fn a_host_key_other_than_the_pinned_one_is_refused() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let session = out["session_id"].as_str().unwrap();
    // An impostor: a real sshd with a different host key, which accepts the session's key.
    let impostor_key =
        russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
    let pem = impostor_key.to_openssh(russh::keys::ssh_key::LineEnding::LF).unwrap();
    let record: toml::Value = toml::from_str(
        &std::fs::read_to_string(user.state_dir().join(format!("sessions/{session}/session.toml"))).unwrap(),
    )
    .unwrap();
    let impostor = crate::support::sshd::Sshd::start(&pem, record["client_key_public"].as_str().unwrap());
    let relay = format!(
        "python3 -c 'import socket,sys,threading\ns=socket.create_connection((\"127.0.0.1\",{}))\ndef up():\n  while True:\n    d=sys.stdin.buffer.raw.read(65536)\n    if not d: break\n    s.sendall(d)\n  s.shutdown(socket.SHUT_WR)\nthreading.Thread(target=up,daemon=True).start()\nwhile True:\n  d=s.recv(65536)\n  if not d: break\n  sys.stdout.buffer.write(d); sys.stdout.buffer.flush()'",
        impostor.port
    );
    let started = Instant::now();
    let run = user.run(&["connect", session, "--proxy-command", &relay, "--", "echo", "pwned"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("host key mismatch: possible interception"), "{}", run.stderr);
    assert!(!run.stdout.contains("pwned"));
    assert!(started.elapsed() < Duration::from_secs(60), "refused at once, no retry until the timeout");
    // The real box still works with the pinned key.
    let run = user.run(&["connect", session, "--", "echo", "real"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "real\n"), "{}", run.stderr);
    user.run(&["terminate", session]).success();
}

#[test]
fn ssh_config_works_with_the_system_ssh() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let session = out["session_id"].as_str().unwrap();
    let config = user.run(&["ssh-config", session]).success().stdout;
    assert!(config.starts_with(&format!("Host ephemeral-admin-{session}\n")), "{config}");
    assert!(
        config.contains("StrictHostKeyChecking yes") && config.contains("UserKnownHostsFile"),
        "{config}"
    );
    let file = user.home.join("ssh_config");
    std::fs::write(&file, &config).unwrap();
    let run = Command::new("ssh")
        .args(["-F"])
        .arg(&file)
        .args(["-o", "BatchMode=yes", &format!("ephemeral-admin-{session}"), "echo", "via-openssh"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "via-openssh\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // `connect` reuses the same pinned keys, and a command's status comes back.
    let run = user.run(&["connect", session, "--", "sh", "-c", "exit 3"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    user.run(&["terminate", session]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn sigint_while_provisioning_leaves_nothing() {
    let cloud = LocalCloud::start();
    cloud.config(json!({ "pending_seconds": 30 }));
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let mut child = user
        .command(&attached_args(&proxy, &["--", "true"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("RunInstances", Duration::from_secs(30), || cloud.count("RunInstances") == 1);
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.lines().last().unwrap().starts_with("error: interrupted"), "{stderr}");
    // One message about it, not a "launch failed" line and then the interruption.
    let about: Vec<&str> =
        stderr.lines().filter(|l| l.contains("interrupted") || l.contains("launch failed")).collect();
    assert_eq!(about.len(), 1, "{stderr}");
    let ledger = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap_or_default();
    assert!(
        ledger.contains("\"ended_by\":\"interrupted\""),
        "Ctrl-C while pending is `interrupted`: {ledger}"
    );
    assert_nothing_left(&cloud);
    assert!(key_files(&user).is_empty());
}

#[test]
fn sigterm_during_the_shell_leaves_nothing() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let mut child = user
        .command(&attached_args(&proxy, &["--", "sleep", "60"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the remote command to run", Duration::from_secs(30), || logged_in(&cloud));
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert_nothing_left(&cloud);
    assert!(key_files(&user).is_empty());
}

/// Some box's sshd has accepted a session's key: the command or shell is starting.
pub fn logged_in(cloud: &LocalCloud) -> bool {
    let boxes = cloud.control("GET", "box", None)["boxes"].as_array().cloned().unwrap_or_default();
    boxes.iter().any(|b| {
        let info = cloud.control("GET", &format!("box/{}", b["instance_id"].as_str().unwrap()), None);
        info["sshd_log"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x.as_str().unwrap_or("").contains("Accepted publickey")))
    })
}

fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok);
}

/// A terminal a person would use: tmux, driven with send-keys and read with capture-pane.
pub struct Tmux {
    name: String,
}

impl Tmux {
    pub fn start(user: &User, width: u16, height: u16) -> Tmux {
        let name =
            format!("ea-test-{}-{}", std::process::id(), user.home.file_name().unwrap().to_string_lossy());
        // The pane's shell gets the same environment the CLI runs with in every other test.
        let cmd = user.command(&[]);
        let mut env_file = String::new();
        for (k, v) in cmd.get_envs() {
            if let (k, Some(v)) = (k.to_string_lossy(), v) {
                env_file.push_str(&format!("export {k}='{}'\n", v.to_string_lossy()));
            }
        }
        env_file.push_str(&format!(
            "export PATH='{}':\"$PATH\"\n",
            std::path::Path::new(cmd.get_program()).parent().unwrap().display()
        ));
        env_file.push_str("export PS1='local$ '\n");
        std::fs::write(user.home.join("env.sh"), env_file).unwrap();
        let t = Tmux { name: name.clone() };
        let ok = t
            .tmux()
            .args(["new-session", "-d", "-s", &name, "-x", &width.to_string(), "-y", &height.to_string()])
            .arg(format!("bash --norc --noprofile --rcfile {}", user.home.join("env.sh").display()))
            .env("TERM", "xterm-256color")
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux starts");
        t.keys(&[&format!(". {}", user.home.join("env.sh").display()), "Enter"]);
        t
    }

    /// The harness's own tmux server (its own socket): the box's tmux, which runs on this
    /// machine's default socket, stays separate and starts with the box's environment.
    fn tmux(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.name]);
        cmd
    }

    pub fn keys(&self, keys: &[&str]) {
        let ok = self.tmux().args(["send-keys", "-t", &self.name]).args(keys).status().unwrap().success();
        assert!(ok);
    }

    pub fn line(&self, text: &str) {
        self.keys(&["-l", text]);
        self.keys(&["Enter"]);
    }

    pub fn screen(&self) -> String {
        let out =
            self.tmux().args(["capture-pane", "-p", "-J", "-S", "-200", "-t", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_for(&self, text: &str, limit: Duration) {
        assert!(self.saw(text, limit), "never saw {text:?} on screen:\n{}", self.screen());
    }

    /// Whether `text` appears on screen within `limit`.
    pub fn saw(&self, text: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while !self.screen().contains(text) {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    fn pane_size(&self) -> String {
        let out = self
            .tmux()
            .args(["display", "-p", "-t", &self.name, "#{pane_height} #{pane_width}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").status();
    }
}

#[test]
fn the_interactive_shell_works_in_a_real_terminal_and_records_a_replayable_cast() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let cast = user.home.join("session.cast");
    let tmux = Tmux::start(&user, 120, 30);
    tmux.wait_for("local$", Duration::from_secs(10));
    let launch = format!(
        "ephemeral-admin launch --my-ip 203.0.113.7 --user {} --proxy-command '{proxy}' --record {}",
        login(),
        cast.display()
    );
    tmux.line(&launch);
    tmux.wait_for("leaving the shell ends the session", Duration::from_secs(60));
    // The prompt appears and a command runs (the arithmetic proves the remote shell evaluated it).
    tmux.line("echo remote-$((40+2))");
    tmux.wait_for("remote-42", Duration::from_secs(20));
    // The PTY has the terminal's real size, and a resize reaches the remote.
    tmux.line("stty size");
    let size = tmux.pane_size();
    tmux.wait_for(&size, Duration::from_secs(10));
    let ok = tmux.tmux().args(["resize-window", "-t", &tmux.name, "-x", "100", "-y", "25"]).status().unwrap();
    assert!(ok.success());
    std::thread::sleep(Duration::from_millis(500));
    let resized = tmux.pane_size();
    assert_ne!(resized, size);
    tmux.line("clear; stty size");
    tmux.wait_for(&resized, Duration::from_secs(10));
    // exit: back to the local shell, everything torn down, the terminal out of raw mode.
    tmux.line("exit");
    tmux.wait_for("deleted the key", Duration::from_secs(30));
    tmux.line("stty -a | tr ' ' '\\n' | grep -qx icanon && echo terminal-restored");
    tmux.wait_for("terminal-restored", Duration::from_secs(10));
    assert_nothing_left(&cloud);

    // The recording: a real player accepts it, and it holds what was typed.
    let text = std::fs::read_to_string(&cast).unwrap();
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let dims = |s: &str| -> (u64, u64) {
        let mut it = s.split(' ').map(|n| n.parse::<u64>().unwrap());
        let rows = it.next().unwrap();
        (it.next().unwrap(), rows)
    };
    let (width, height) = dims(&size);
    assert_eq!((header["width"].as_u64(), header["height"].as_u64()), (Some(width), Some(height)));
    let events: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        events.iter().all(|e| e[0].is_f64() && matches!(e[1].as_str(), Some("o" | "r")) && e[2].is_string())
    );
    let output: String = events.iter().filter(|e| e[1] == "o").map(|e| e[2].as_str().unwrap()).collect();
    assert!(output.contains("echo remote-$((40+2))") && output.contains("remote-42"), "typed text recorded");
    let (width, height) = dims(&resized);
    let resize = format!("{width}x{height}");
    assert!(events.iter().any(|e| e[1] == "r" && e[2] == resize.as_str()), "the resize {resize} is recorded");
    // asciinema wants a terminal even to cat: give it one with util-linux's `script`.
    let played = Command::new("script")
        .args(["-qec", &format!("asciinema cat {}", cast.display()), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(played.status.success(), "asciinema cat: {}", String::from_utf8_lossy(&played.stderr));
    assert!(String::from_utf8_lossy(&played.stdout).contains("remote-42"));
}

/// The box's tmux session is this machine's one `ephemeral-admin` session: tests that use it
/// take turns.
pub static BOX_TMUX: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a client is attached to the box's tmux session. The box simulator's sshd runs on this
/// machine, so the box's tmux server is this machine's.
pub fn box_tmux_attached() -> bool {
    let out =
        Command::new("tmux").args(["display", "-p", "-t", "ephemeral-admin", "#{session_attached}"]).output();
    out.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim().parse::<u32>().unwrap_or(0) > 0
    })
}

#[test]
fn tmux_keeps_the_work_across_a_dropped_connection_and_connect_reattaches() {
    // `--tmux` alone: a tmux session exists to outlive the connection, so it implies `--keep`.
    let _turn = BOX_TMUX.lock().unwrap_or_else(|p| p.into_inner());
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    // A box tmux session left by an earlier, failed run would fool the checks below.
    let _ = Command::new("tmux").args(["kill-session", "-t", "ephemeral-admin"]).status();
    let tmux = Tmux::start(&user, 120, 30);
    tmux.wait_for("local$", Duration::from_secs(10));
    tmux.line(&format!(
        "ephemeral-admin launch --tmux --my-ip 203.0.113.7 --user {} --proxy-command '{proxy}'",
        login()
    ));
    // The box's tmux redraws the screen as soon as it attaches (the banner may never be seen), and
    // keys typed before its client owns the terminal would reach the shell instead: wait for it.
    wait_until("a client on the box's tmux session", Duration::from_secs(60), box_tmux_attached);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("export MARK=kept-$((6*7))");
    // The box's tmux lets go of its client, as when the connection drops: the remote command
    // ends, the work stays on the box. (Typing C-b d through the nested terminals is racy on a
    // loaded machine: a CI run saw the box's shell receive the keys instead of its tmux.)
    let ok = Command::new("tmux").args(["detach-client", "-s", "ephemeral-admin"]).status().unwrap();
    assert!(ok.success(), "the box's tmux has a client to detach");
    tmux.wait_for("left session", Duration::from_secs(30));
    let listed = user.run(&["list", "--output", "json"]).success().json();
    let session = listed["sessions"][0]["session_id"].as_str().unwrap().to_string();
    assert_eq!(listed["sessions"][0]["kept"], true, "{listed}");
    assert_eq!(listed["sessions"][0]["idle_grace_seconds"], 1800, "the kept idle policy: {listed}");
    tmux.line(&format!("ephemeral-admin connect {session} --tmux"));
    wait_until("connect to re-attach", Duration::from_secs(60), box_tmux_attached);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("echo mark=$MARK");
    tmux.wait_for("mark=kept-42", Duration::from_secs(20));
    let _ = Command::new("tmux").args(["detach-client", "-s", "ephemeral-admin"]).status();
    let _ = Command::new("tmux").args(["kill-session", "-t", "ephemeral-admin"]).status();
    user.run(&["terminate", &session]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn connect_pipes_megabytes_through_a_proxy_command_both_ways() {
    // A simple relay (box-connect blocks writing its stdout until someone reads it): the client
    // must keep reading while it writes, or both sides wait forever.
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let session = out["session_id"].as_str().unwrap();
    let data: Vec<u8> =
        (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let input = user.home.join("input.bin");
    std::fs::write(&input, &data).unwrap();
    let output = user
        .command(&["connect", session, "--", "cat"])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(output.wait_with_output()));
    let result =
        rx.recv_timeout(Duration::from_secs(120)).expect("connect -- cat finished (no stall)").unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(result.stdout.len(), data.len());
    assert!(result.stdout == data, "byte for byte");
    user.run(&["terminate", session]).success();
}

/// Issue #31: an AWS profile name is data, never shell text. A hostile `--profile` or
/// `AWS_PROFILE` is refused (exit 2, one line) before `ssh-config` prints a ProxyCommand or the
/// SSM route starts one, so the command it smuggles in never runs. (Before the fix, `ssh-config`
/// printed it into the ProxyCommand unquoted and `connect --connect ssm` ran it through `sh -c`.)
#[test]
fn a_hostile_aws_profile_runs_nothing_on_the_ssm_route_or_in_ssh_config() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let out = ssm_box(&cloud, &user);
    let session = out["session_id"].as_str().unwrap();
    let marker = user.home.join("profile-ran");
    let hostile = format!("x;touch${{IFS}}{};#", marker.display());
    let runs = [
        user.run(&["ssh-config", session, "--profile", &hostile]),
        user.env("AWS_PROFILE", &hostile).run(&["ssh-config", session]),
        user.run(&["connect", session, "--connect", "ssm", "--profile", &hostile, "--", "true"]),
        user.env("AWS_PROFILE", &hostile).run(&["connect", session, "--connect", "ssm", "--", "true"]),
    ];
    for run in runs {
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
        assert!(run.stderr.contains("invalid AWS profile"), "{}", run.stderr);
    }
    assert!(!marker.exists(), "the profile's command ran");
    // (An ordinary profile's ProxyCommand is the property tests' (`ssh::quote_props`): here the
    // box's first connection, which gives it its own host key, would need Session Manager, which
    // the local cloud does not have.)
    user.run(&["terminate", session]).success();
    assert_nothing_left(&cloud);
}

/// Issue #31: `--record FILE -- CMD` records the command's output as an asciicast (it wrote
/// nothing and said nothing before), and a recording is the user's alone: 0600, an existing
/// 0644 file narrowed and overwritten, a symbolic link refused before the command runs.
#[test]
fn record_with_a_command_writes_a_private_asciicast_of_its_output() {
    use std::os::unix::fs::PermissionsExt;
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let cast = user.home.join("command.cast");
    std::fs::write(&cast, "an older recording").unwrap();
    std::fs::set_permissions(&cast, std::fs::Permissions::from_mode(0o644)).unwrap();
    let command = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let run = user
        .run(&attached_args(&proxy, &[&["--record", cast.to_str().unwrap(), "--"][..], &command].concat()));
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.stdout, "out\n", "the output still goes where it did");
    assert_eq!(std::fs::metadata(&cast).unwrap().permissions().mode() & 0o7777, 0o600);
    let text = std::fs::read_to_string(&cast).unwrap();
    let mut lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    let header = lines.next().unwrap();
    assert_eq!(
        (header["version"].as_u64(), header["command"].as_str()),
        (Some(2), Some("sh -c 'echo out; echo err >&2; exit 3'"))
    );
    let shown: String = lines.filter(|e| e[1] == "o").map(|e| e[2].as_str().unwrap().to_string()).collect();
    assert!(shown.contains("out\r\n") && shown.contains("err\r\n"), "{shown:?}");
    assert_nothing_left(&cloud);

    // A link is not followed: refused as bad input before anything is launched.
    let target = user.home.join("target");
    std::fs::write(&target, "keep").unwrap();
    let link = user.home.join("link.cast");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let marker = user.home.join("command-ran");
    let touch = format!("touch {}", marker.display());
    let run =
        user.run(&attached_args(&proxy, &["--record", link.to_str().unwrap(), "--", "sh", "-c", &touch]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--record") && run.stderr.contains("symbolic link"), "{}", run.stderr);
    assert_eq!(cloud.count("RunInstances"), 1, "nothing launched for it");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    assert!(!marker.exists(), "the command ran");
    // Nothing to record (--detach, -N) is said, not ignored: exit 2, nothing launched.
    for extra in ["--detach", "-N"] {
        let run = user.run(&attached_args(&proxy, &["--record", cast.to_str().unwrap(), extra]));
        assert_eq!(run.code, 2, "{extra}: {}", run.stderr);
        assert!(run.stderr.contains("--record"), "{extra}: {}", run.stderr);
    }
    assert_eq!(cloud.count("RunInstances"), 1, "nothing launched for them");
    assert_nothing_left(&cloud);
}
