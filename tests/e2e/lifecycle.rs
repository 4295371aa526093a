//! The box's own lifecycle, end to end: the CLI renders the user-data, the box simulator runs
//! the real watchdog from it against a loopback sshd and a fake IMDS serving the instance's tags
//! from moto, and the watchdog's power-off becomes TerminateInstances. Short configured intervals
//! keep these quick; the timeouts below only stop a hung test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{LocalCloud, User};

/// A user whose boxes use short watchdog intervals.
fn quick_user(cloud: &LocalCloud, config: &str) -> User {
    let user = User::new(cloud);
    user.write_config(&format!("watchdog_interval = \"1s\"\n{config}"));
    user
}

fn launch(user: &User, extra: &[&str]) -> (String, String) {
    let mut args =
        vec!["launch", "--detach", "--output", "json", "--my-ip", "203.0.113.7", "--user", login()];
    args.extend_from_slice(extra);
    let out = user.run(&args).success().json();
    (out["session_id"].as_str().unwrap().to_string(), out["instance_id"].as_str().unwrap().to_string())
}

/// The local account that the box simulator's sshd lets in (root in CI).
pub fn login() -> &'static str {
    static LOGIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LOGIN.get_or_init(|| {
        let out = Command::new("id").arg("-un").output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

fn box_info(cloud: &LocalCloud, instance: &str) -> Value {
    cloud.control("GET", &format!("box/{instance}"), None)
}

fn instance_state(cloud: &LocalCloud, instance: &str) -> String {
    let state = cloud.state();
    let found = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance).cloned();
    found.map(|i| i["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

/// Polls until `done` or the hang guard fires.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn wait_box_up(cloud: &LocalCloud, instance: &str) -> u16 {
    wait_until("the box's sshd", Duration::from_secs(30), || box_info(cloud, instance)["state"] == "up");
    box_info(cloud, instance)["ssh_port"].as_u64().unwrap() as u16
}

fn wait_terminated(cloud: &LocalCloud, instance: &str, limit: Duration) -> Duration {
    wait_until("termination", limit, || instance_state(cloud, instance) == "terminated")
}

/// OpenSSH's own client, logging in with the session key and pinning the session host key.
pub fn ssh(user: &User, session: &str, port: u16, extra: &[&str]) -> Command {
    ssh_to(user, session, "127.0.0.1", port, extra)
}

/// [`ssh`] to any address of the box.
pub fn ssh_to(user: &User, session: &str, host: &str, port: u16, extra: &[&str]) -> Command {
    let dir = user.state_dir().join(format!("sessions/{session}"));
    let record: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("session.toml")).unwrap()).unwrap();
    let known_hosts = dir.join("test_known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "{} {}\n",
            if port == 22 { host.to_string() } else { format!("[{host}]:{port}") },
            record["host_key_public"].as_str().unwrap()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-i"])
        .arg(dir.join("id_ed25519"))
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-p", &port.to_string(), &format!("{}@{host}", login())])
        .args(extra);
    cmd
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_lines(info: &Value, key: &str) -> Vec<String> {
    info[key].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

#[test]
fn a_box_nobody_connects_to_powers_off_after_the_boot_grace() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"4s\"\nidle_grace = \"3s\"\nkept_idle_grace = \"3s\"\n");
    // Every launch connects once (the box gets its own host key then): this one is killed just
    // before its first connection, so nobody ever connects.
    let args = vec!["launch", "--detach", "--my-ip", "203.0.113.7", "--user", login()];
    let out = user.command(&args).env("EPHEMERAL_ADMIN_ABORT_AFTER", "connecting").output().unwrap();
    assert_eq!(out.status.code(), None, "killed: {}", String::from_utf8_lossy(&out.stderr));
    let instance = cloud.state()["instances"][0]["id"].as_str().unwrap().to_string();
    wait_box_up(&cloud, &instance);
    let up = Instant::now();
    wait_terminated(&cloud, &instance, Duration::from_secs(30));
    assert!(up.elapsed() >= Duration::from_secs(4), "not before the grace: {:?}", up.elapsed());
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "never-connected", "{info:#}");
}

/// The watchdog counts the sessions of the box's own sshd, whichever address they came in on:
/// here, its public address at port 22.
#[test]
fn a_connection_to_the_public_ip_counts_as_activity_too() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"3s\"\nkept_idle_grace = \"3s\"\n");
    let (session, instance) = launch(&user, &[]);
    wait_box_up(&cloud, &instance);
    let direct =
        box_info(&cloud, &instance)["direct"].as_str().expect("sshd listens on the public IP").to_string();
    let (host, port) = direct.rsplit_once(':').unwrap();
    let tunnel = Kill(
        ssh_to(&user, &session, host, port.parse().unwrap(), &["-N"]).stdin(Stdio::null()).spawn().unwrap(),
    );
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(instance_state(&cloud, &instance), "running", "two idle graces with a direct session open");
    let info = box_info(&cloud, &instance);
    assert!(log_lines(&info, "watchdog_log").iter().any(|l| l.ends_with("ssh connections=1")), "{info:#}");
    drop(tunnel);
    wait_terminated(&cloud, &instance, Duration::from_secs(20));
    assert_eq!(box_info(&cloud, &instance)["poweroff_reason"], "idle");
}

#[test]
fn an_open_session_keeps_the_box_and_closing_it_ends_the_box_one_grace_later() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"3s\"\nkept_idle_grace = \"3s\"\n");
    let (session, instance) = launch(&user, &[]);
    let port = wait_box_up(&cloud, &instance);
    // A non-interactive session with no PTY still counts (an authenticated session is activity).
    let tunnel = Kill(ssh(&user, &session, port, &["-N"]).stdin(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(instance_state(&cloud, &instance), "running", "three idle graces with a session open");
    drop(tunnel);
    let closed = Instant::now();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(instance_state(&cloud, &instance), "running", "not before one grace after the close");
    wait_terminated(&cloud, &instance, Duration::from_secs(20));
    assert!(closed.elapsed() >= Duration::from_secs(3));
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "idle", "{info:#}");
    assert!(log_lines(&info, "wall").iter().any(|l| l.contains("powering off")), "users were warned");
}

/// Issue #31: a TCP connection to sshd that never logs in (here one reconnecting every second
/// from this machine, as a non-root process on the box could over loopback) is not activity: the
/// box still powers off one idle grace after the last authenticated session ends, while a logged-in
/// session does keep it up. (Before the fix the watchdog counted sockets, and this box stayed up.)
#[test]
fn an_unauthenticated_connection_to_sshd_does_not_keep_the_box_up() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"3s\"\nkept_idle_grace = \"3s\"\n");
    let (session, instance) = launch(&user, &[]);
    let port = wait_box_up(&cloud, &instance);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let raw = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Held open a second, never a byte sent: sshd waits for a banner that never comes.
                let held = std::net::TcpStream::connect(("127.0.0.1", port));
                std::thread::sleep(Duration::from_secs(1));
                drop(held);
            }
        })
    };
    let tunnel = Kill(ssh(&user, &session, port, &["-N"]).stdin(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(instance_state(&cloud, &instance), "running", "two idle graces with a session open");
    let info = box_info(&cloud, &instance);
    let counts: Vec<String> =
        log_lines(&info, "watchdog_log").into_iter().filter(|l| l.contains("ssh connections=")).collect();
    // Only the logged-in session counts, never the raw socket beside it (which made 2 before).
    assert_eq!(
        counts.last().map(String::as_str),
        Some("ephemeral-admin-watchdog: ssh connections=1"),
        "{counts:#?}"
    );
    drop(tunnel);
    let closed = Instant::now();
    let took = wait_terminated(&cloud, &instance, Duration::from_secs(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    raw.join().unwrap();
    assert!(closed.elapsed() >= Duration::from_secs(3), "not before the grace: {took:?}");
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "idle", "{info:#}");
    let counts: Vec<String> =
        log_lines(&info, "watchdog_log").into_iter().filter(|l| l.contains("ssh connections=")).collect();
    assert!(
        counts.iter().all(|l| !l.ends_with("connections=2")),
        "the raw socket never counted: {counts:#?}"
    );
}

#[test]
fn the_deadline_ends_the_box_even_with_a_session_open_after_warning() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"60s\"\n");
    let launched = Instant::now();
    let (session, instance) = launch(&user, &["--max-runtime", "12s"]);
    let port = wait_box_up(&cloud, &instance);
    let _tunnel = Kill(ssh(&user, &session, port, &["-N"]).stdin(Stdio::null()).spawn().unwrap());
    wait_terminated(&cloud, &instance, Duration::from_secs(40));
    assert!(
        launched.elapsed() >= Duration::from_secs(11),
        "not before the deadline: {:?}",
        launched.elapsed()
    );
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "deadline", "{info:#}");
    let wall = log_lines(&info, "wall");
    let warned = wall.iter().position(|l| l.contains("deadline") || l.contains("left")).expect("a warning");
    let off = wall.iter().position(|l| l.contains("powering off")).expect("a power-off notice");
    assert!(warned < off, "warned first: {wall:?}");
    assert!(
        log_lines(&info, "watchdog_log").iter().any(|l| l.contains("deadline source=imds")),
        "read the tag"
    );
}

#[test]
fn extend_moves_the_deadline_the_watchdog_enforces() {
    let cloud = LocalCloud::start();
    let user = quick_user(
        &cloud,
        "boot_grace = \"60s\"\nidle_grace = \"60s\"\nmax_runtime = \"30m\"\nmax_runtime_cap = \"1h\"\n",
    );
    let launched = Instant::now();
    let (session, instance) = launch(&user, &["--max-runtime", "10s"]);
    wait_box_up(&cloud, &instance);
    let out = user.run(&["extend", &session, "--by", "10s", "--output", "json"]).success().json();
    assert_eq!(out["added_seconds"], 10);
    let tag = cloud.state()["instances"][0]["tags"]["ephemeral-admin:expires-at"].clone();
    assert_eq!(tag, out["expires_at"], "the tag is the deadline");
    let record =
        std::fs::read_to_string(user.state_dir().join(format!("sessions/{session}/session.toml"))).unwrap();
    assert!(record.contains(out["expires_at"].as_str().unwrap()), "the local record follows");

    // Past the cap: refused, naming the cap and the key; the tag stays.
    let run = user.run(&["extend", &session, "--by", "2h"]);
    assert_eq!(run.code, 2, "bad input");
    assert!(
        run.stderr.contains("hard cap of 1h") && run.stderr.contains("max_runtime_cap"),
        "{}",
        run.stderr
    );
    assert_eq!(cloud.state()["instances"][0]["tags"]["ephemeral-admin:expires-at"], tag);

    while launched.elapsed() < Duration::from_secs(13) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(instance_state(&cloud, &instance), "running", "the old deadline no longer applies");
    wait_terminated(&cloud, &instance, Duration::from_secs(30));
    assert!(
        launched.elapsed() >= Duration::from_secs(19),
        "ended at the new deadline: {:?}",
        launched.elapsed()
    );
    assert_eq!(box_info(&cloud, &instance)["poweroff_reason"], "deadline");

    // A session that is not running cannot be extended.
    let run = user.run(&["extend", &session, "--by", "1m"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("not running"), "{}", run.stderr);
    assert_eq!(user.run(&["extend", &session, "--by", "5"]).code, 2, "bad --by never reaches AWS");
}

#[test]
fn a_deadline_tag_past_the_cap_is_ignored_and_the_box_ends_at_the_cap() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"60s\"\nmax_runtime_cap = \"14s\"\n");
    let launched = Instant::now();
    let (_, instance) = launch(&user, &["--max-runtime", "8s"]);
    wait_box_up(&cloud, &instance);
    // Someone else moves the deadline tag an hour out, past launch + max_runtime_cap.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let tag = later.format(&time::format_description::well_known::Rfc3339).unwrap();
    cloud.retag(&instance, "ephemeral-admin:expires-at", &tag);
    wait_terminated(&cloud, &instance, Duration::from_secs(40));
    assert!(
        launched.elapsed() >= Duration::from_secs(12),
        "ended at the cap, not the old deadline: {:?}",
        launched.elapsed()
    );
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "deadline", "{info:#}");
    let log = log_lines(&info, "watchdog_log");
    assert!(log.iter().any(|l| l.contains("past the cap") && l.contains("ignored")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("reason=deadline") && l.contains("source=cap")), "{log:#?}");
}

#[test]
fn without_instance_metadata_the_baked_deadline_still_ends_the_box() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"60s\"\n");
    let launched = Instant::now();
    let (session, instance) = launch(&user, &["--max-runtime", "10s"]);
    wait_box_up(&cloud, &instance);
    cloud.control("POST", &format!("box/{instance}/imds"), Some(json!({ "available": false })));
    // The tag moves later, but the box cannot read it: the baked deadline holds.
    user.run(&["extend", &session, "--by", "1h"]).success();
    wait_terminated(&cloud, &instance, Duration::from_secs(30));
    assert!(launched.elapsed() < Duration::from_secs(30));
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "deadline");
    // It never learnt of the extension: every deadline it used is the one baked into user-data.
    let log = log_lines(&info, "watchdog_log");
    let baked =
        log[0].split("baked_deadline=").nth(1).expect("the start line names the baked deadline").to_string();
    for line in log.iter().filter(|l| l.contains("deadline source=") || l.contains("reason=deadline")) {
        assert!(line.contains(baked.as_str()), "{line} uses another deadline than {baked}: {log:#?}");
    }
}

#[test]
fn a_spot_interruption_notice_reaches_a_logged_in_user() {
    let cloud = LocalCloud::start();
    let user = quick_user(&cloud, "boot_grace = \"60s\"\nidle_grace = \"60s\"\n");
    let (session, instance) = launch(&user, &[]);
    let port = wait_box_up(&cloud, &instance);
    // A logged-in user with a terminal.
    let mut shell = ssh(&user, &session, port, &["-tt", "sleep 30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = shell.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    wait_until("the watchdog to see the session", Duration::from_secs(20), || {
        log_lines(&box_info(&cloud, &instance), "watchdog_log")
            .iter()
            .any(|l| l.contains("ssh connections=1"))
    });
    cloud.control(
        "POST",
        &format!("box/{instance}/spot-notice"),
        Some(json!({ "action": "terminate", "time": "2099-01-01T00:00:00Z" })),
    );
    wait_until("the notice on the user's terminal", Duration::from_secs(20), || {
        String::from_utf8_lossy(&seen.lock().unwrap()).contains("spot")
    });
    let _ = shell.kill();
    let _ = shell.wait();
    let wall = log_lines(&box_info(&cloud, &instance), "wall");
    assert_eq!(wall.iter().filter(|l| l.contains("spot")).count(), 1, "warned once: {wall:?}");
}
