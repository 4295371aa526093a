//! The real-box tier: the CLI against a real Linux VM running real cloud-init, systemd, sshd and
//! our watchdog, all from the CLI's own user-data. The box simulator's real-VM mode boots the
//! Debian cloud image of `tests/support/realbox/` under QEMU for each instance, serves it the
//! instance's tags through its IMDSv2, forwards the box's public IP to the guest's sshd (and the
//! local EC2 Instance Connect Endpoint to the guest's sshd and resume relay), and turns the
//! guest's poweroff into TerminateInstances.
//!
//! Three VM lifecycles (minutes under TCG), so these are ignored in the default run;
//! `scripts/test` builds the image and runs them one at a time:
//! `cargo test --test e2e realbox:: -- --ignored --test-threads=1`. Every wait has a hang guard.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lifecycle::wait_until;
use crate::session::assert_nothing_left;
use crate::support::{LocalCloud, User};

/// The image's default user (Debian's cloud-init), who gets the session key.
const LOGIN: &str = "debian";
/// Hang guard for a TCG boot until sshd answers (about 40 s on an idle 2-core machine).
const BOOT: Duration = Duration::from_secs(300);

fn user(cloud: &LocalCloud, config: &str) -> User {
    let user = User::new(cloud);
    // Every watchdog round costs the TCG guest two curl runs: not every second.
    user.write_config(&format!("watchdog_interval = \"3s\"\nconnect_timeout = \"6m\"\n{config}"));
    user
}

fn box_info(cloud: &LocalCloud, instance: &str) -> Value {
    cloud.control("GET", &format!("box/{instance}"), None)
}

fn lines(info: &Value, key: &str) -> Vec<String> {
    info[key].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

fn instance_state(cloud: &LocalCloud, instance: &str) -> String {
    let state = cloud.state();
    let found = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance).cloned();
    found.map(|i| i["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

fn wait_terminated(cloud: &LocalCloud, instance: &str, limit: Duration) {
    wait_until("termination", limit, || instance_state(cloud, instance) == "terminated");
}

/// Waits for the VM's sshd; returns the box (`direct` is "<public ip>:<port>").
fn wait_up(cloud: &LocalCloud, instance: &str) -> Value {
    wait_until("the VM's sshd", BOOT, || box_info(cloud, instance)["state"] != "booting");
    let info = box_info(cloud, instance);
    assert_eq!(info["state"], "up", "{:#}", info);
    assert_eq!(info["vm"], true);
    info
}

fn direct(info: &Value) -> (String, u16) {
    let direct = info["direct"].as_str().expect("the public IP reaches the guest");
    let (ip, port) = direct.rsplit_once(':').unwrap();
    (ip.to_string(), port.parse().unwrap())
}

fn launch_detached(user: &User, extra: &[&str]) -> (String, String) {
    let mut args = vec!["launch", "--detach", "--output", "json", "--my-ip", "203.0.113.7", "--user", LOGIN];
    args.extend_from_slice(extra);
    let out = user.run(&args).success().json();
    (out["session_id"].as_str().unwrap().to_string(), out["instance_id"].as_str().unwrap().to_string())
}

fn session_dir(user: &User, session: &str) -> PathBuf {
    user.state_dir().join(format!("sessions/{session}"))
}

/// "ssh-ed25519 AAAA..." as pinned in the session record.
fn pinned_key(user: &User, session: &str) -> String {
    let text = std::fs::read_to_string(session_dir(user, session).join("session.toml")).unwrap();
    let record: toml::Value = toml::from_str(&text).unwrap();
    let key = record["host_key_public"].as_str().unwrap();
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Every host key the server at ip:port offers, as "type base64".
fn keyscan(ip: &str, port: u16) -> Vec<String> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", "20", "-t", "rsa,ecdsa,ed25519", "-p", &port.to_string(), ip])
        .output()
        .expect("run ssh-keyscan");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut keys: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().skip(1).take(2).collect::<Vec<_>>().join(" "))
        .collect();
    keys.sort();
    keys
}

/// The laptop: `connect SESSION -- sleep 900` through the local EC2 Instance Connect Endpoint and
/// the box's resume relay.
fn laptop(user: &User, session: &str) -> Child {
    user.command(&["connect", session, "--", "sleep", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start connect")
}

/// A watchdog line counting one SSH connection or more (an eice laptop holds two: the tunnel's
/// outer connection and the relay's).
fn connected(line: &str) -> bool {
    line.split("ssh connections=")
        .nth(1)
        .and_then(|n| n.split_whitespace().next()?.parse::<u32>().ok())
        .is_some_and(|n| n >= 1)
}

fn signal(pid: u32, name: &str) {
    assert!(Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap().success());
}

/// Waits for a child with a hang guard (killed when it passes).
fn wait_output(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().unwrap()
}

fn epoch(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn rfc3339_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn watchdog_says(cloud: &LocalCloud, instance: &str, what: &str, limit: Duration) {
    wait_until(&format!("the watchdog to log {what:?}"), limit, || {
        lines(&box_info(cloud, instance), "watchdog_log").iter().any(|l| l.contains(what))
    });
}

/// Lifecycle 1: `launch -- CMD` on a real box: sshd offers the pinned host key and no other, the
/// watchdog runs under systemd, real cloud-init accepts the cloud-config and runs the setup
/// script before the command (its log streamed to stderr), the command's output and status come
/// back, and teardown leaves nothing.
#[test]
#[ignore = "real-box tier (QEMU): scripts/test runs it"]
fn launch_runs_a_command_on_a_real_box_that_offers_only_the_pinned_host_key() {
    let cloud = LocalCloud::start_real_vm();
    let user = user(&cloud, "idle_grace = \"2m\"\nboot_grace = \"10m\"\n");
    let script = "sudo cloud-init status --wait >/dev/null 2>&1; \
        echo watchdog=$(sudo systemctl is-active ephemeral-admin-watchdog.service); \
        sudo cloud-init schema --system >/dev/null 2>&1 && echo schema=valid || echo schema=invalid; \
        sudo sshd -T | grep -E '^(clientaliveinterval|clientalivecountmax|passwordauthentication) '; \
        echo cap=$(sudo systemctl is-active ephemeral-admin-cap.timer); \
        echo host_keys=$(ls /etc/ssh | grep -c '^ssh_host_.*_key$'); \
        echo marker=$(cat /tmp/ea-setup-marker); \
        echo setup_log=$(sudo stat -c '%a %U' /var/log/ephemeral-admin/setup.log); \
        h='X-aws-ec2-metadata-token-ttl-seconds: 60'; u=http://169.254.169.254/latest; \
        echo imds_user=$(curl -s -o /dev/null -m 5 -w '%{http_code}' $u/user-data); \
        echo imds_user_token=$(curl -s -o /dev/null -m 5 -w '%{http_code}' -X PUT -H \"$h\" $u/api/token); \
        t=$(sudo curl -s -m 5 -X PUT -H \"$h\" $u/api/token); \
        echo imds_root=$(sudo curl -s -m 5 -H \"X-aws-ec2-metadata-token: $t\" $u/user-data | head -n 1); \
        echo scanned=$(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | grep -v '^#' | cut -d' ' -f2,3); \
        echo to-stderr >&2; exit 7";
    let setup = "echo setup-ran-as-$(id -un); echo made > /tmp/ea-setup-marker";
    let child = user
        .command(&[
            "launch",
            "--my-ip",
            "203.0.113.7",
            "--user",
            LOGIN,
            "--setup-script",
            setup,
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the instance", Duration::from_secs(60), || {
        !cloud.control("GET", "box", None)["boxes"].as_array().unwrap().is_empty()
    });
    let instance = cloud.control("GET", "box", None)["boxes"][0]["instance_id"].as_str().unwrap().to_string();
    let info = wait_up(&cloud, &instance);
    let (ip, port) = direct(&info);
    let sessions: Vec<_> = std::fs::read_dir(user.state_dir().join("sessions")).unwrap().flatten().collect();
    let session = sessions[0].file_name().to_string_lossy().into_owned();
    // The launch's first connection gives the box its own host key: wait for the record to say so.
    wait_until("the host-key rotation", BOOT + Duration::from_secs(120), || {
        let text = std::fs::read_to_string(session_dir(&user, &session).join("session.toml")).unwrap();
        text.contains("host_key_state = \"box\"")
    });
    let pinned = pinned_key(&user, &session);
    let user_data =
        std::fs::read_to_string(PathBuf::from(info["dir"].as_str().unwrap()).join("user-data")).unwrap();
    assert!(!user_data.contains(&pinned), "the pinned key is the box's own, not the user-data's");
    let offered = keyscan(&ip, port);
    assert_eq!(offered, vec![pinned.clone()], "sshd offers the pinned (rotated) host key and no other");

    let out = wait_output(child, BOOT + Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the remote status comes back\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "watchdog=active\n",
        "schema=valid\n",
        "clientaliveinterval 10\n",
        "clientalivecountmax 3\n",
        "passwordauthentication no\n",
        "cap=active\n",
        "host_keys=1\n",
        "marker=made\n",
        // Root's alone (issue #31); the launch still streamed it, through sudo -n.
        "setup_log=600 root\n",
        // The IMDS is fenced off for the (non-root) login user, not for root.
        "imds_user=000\n",
        "imds_user_token=000\n",
        "imds_root=#cloud-config\n",
        &format!("scanned={pinned}\n"),
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}\nstderr:\n{stderr}");
    }
    assert!(stderr.contains("to-stderr"), "{stderr}");
    let streamed = stderr.find("setup-ran-as-root").unwrap_or_else(|| panic!("the setup's log: {stderr}"));
    assert!(stderr[streamed..].contains("setup done"), "{stderr}");
    assert_nothing_left(&cloud);
    assert!(!session_dir(&user, &session).join("id_ed25519").exists(), "the private key is deleted");
    let log = lines(&box_info(&cloud, &instance), "watchdog_log");
    assert!(log.iter().any(|l| l.contains(" start ") || l.contains(": start ")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("ssh connections=1")), "the real sshd's session counts: {log:#?}");
}

/// Lifecycle 2, in no-inbound mode (`connect = "eice"`): the box's resume relay starts on real
/// systemd (a dynamic user, the image's python3, from gzip'd user-data) and carries a command
/// across a tunnel the endpoint closes. Then a vanished laptop: its client stops answering without
/// closing anything (frozen, so the tunnel stays up). The relay holds sshd's side, but sshd's
/// probes go unanswered and drop it, the watchdog sees the box idle, and after the idle grace
/// the box powers off, although a non-root process on the box keeps an unauthenticated
/// connection to sshd open all along (the watchdog counts logged-in sessions, not sockets). On the
/// way, `extend` and a tag past the cap reach the real watchdog through the IMDS.
#[test]
#[ignore = "real-box tier (QEMU): scripts/test runs it"]
fn an_eice_box_resumes_across_tunnels_and_a_vanished_laptop_still_powers_it_off_after_the_idle_grace() {
    let cloud = LocalCloud::start_real_vm();
    let user = user(
        &cloud,
        // Detached, so a kept session: kept_idle_grace is its idle grace. It runs from the end of
        // the launch's own connection (the host-key rotation) until the `connect` below is in:
        // room for a TCG guest to take a new tunnel and two SSH handshakes.
        "kept_idle_grace = \"20s\"\nboot_grace = \"10m\"\nmax_runtime = \"30m\"\nmax_runtime_cap = \"1h\"\n",
    );
    let ws = cloud.control("GET", "eice", None)["ws_url"].as_str().unwrap().to_string();
    let user = user.env("EPHEMERAL_ADMIN_EICE_ENDPOINT_URL", &ws);
    cloud.control("PUT", "eice", Some(json!({"create_seconds": 0})));
    user.run(&["setup", "eice", "-q"]).success();
    let args = ["launch", "--detach", "--connect", "eice", "--output", "json", "--user", LOGIN];
    let out = user.run(&args).success().json();
    let (session, instance) =
        (out["session_id"].as_str().unwrap().to_string(), out["instance_id"].as_str().unwrap().to_string());
    assert!(out["public_ip"].is_null(), "{out}");
    wait_up(&cloud, &instance);

    // The relay on the real box, and a command that outlives a tunnel.
    // Long enough for a TCG guest to take a new tunnel's outer SSH handshake and start python.
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 12})));
    // A non-root process on the box holds an unauthenticated TCP connection to sshd, again and
    // again (sshd drops it after its login grace): it must not keep the box up (issue #31).
    let script = "sudo cloud-init status --wait >/dev/null 2>&1; \
        sudo -u nobody setsid -f python3 -c \"import socket,time;[(lambda s:(s.recv(9),s.recv(9),s.close()))(socket.create_connection(('127.0.0.1',22))) or time.sleep(1) for _ in iter(int,1)]\" </dev/null >/dev/null 2>&1; \
        echo holders=$(pgrep -u nobody -c python3); \
        echo relay=$(systemctl is-active ephemeral-admin-resume.service); \
        pid=$(systemctl show -p MainPID --value ephemeral-admin-resume.service); \
        echo user=$(ps -o user= -p \"$pid\"); sleep 16; echo survived";
    let run = user.run(&["connect", &session, "--", "sh", "-c", script]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("relay=active\n"), "{}", run.stdout);
    assert!(run.stdout.contains("holders=1\n"), "the non-root holder runs: {}", run.stdout);
    let relay_user = run.stdout.lines().find_map(|l| l.strip_prefix("user=")).unwrap_or_default().trim();
    assert!(
        !relay_user.is_empty() && relay_user != "root",
        "the relay runs as a dynamic user: {}",
        run.stdout
    );
    assert!(run.stdout.contains("survived"), "{}", run.stdout);
    let closed = cloud.control("GET", "eice", None)["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["close_code"] == 1000 && t["remote_port"] == "22")
        .count();
    assert!(closed >= 1, "the command outlived a closed tunnel");
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 3600})));

    let mut client = laptop(&user, &session);
    wait_until("the watchdog to count the laptop's session", Duration::from_secs(240), || {
        if client.try_wait().unwrap().is_some() {
            client = laptop(&user, &session);
        }
        lines(&box_info(&cloud, &instance), "watchdog_log").iter().any(|l| connected(l))
    });

    let out = user.run(&["extend", &session, "--by", "10m", "--output", "json"]).success().json();
    let extended = epoch(out["expires_at"].as_str().unwrap());
    watchdog_says(
        &cloud,
        &instance,
        &format!("deadline source=imds value={extended} "),
        Duration::from_secs(30),
    );
    cloud.retag(&instance, "ephemeral-admin:expires-at", &rfc3339_in(2 * 3600));
    watchdog_says(&cloud, &instance, "past the cap", Duration::from_secs(30));
    watchdog_says(&cloud, &instance, "deadline source=cap", Duration::from_secs(5));

    signal(client.id(), "STOP");
    let vanished = Instant::now();
    // sshd: 10 s x 3 probes (~40 s) for the tunnel's outer connection, as many again for the
    // relay's; then the 20 s grace; then a TCG poweroff.
    wait_terminated(&cloud, &instance, Duration::from_secs(40 + 40 + 20 + 150));
    let gone = vanished.elapsed();
    signal(client.id(), "KILL");
    let _ = client.wait();
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "idle", "{:#}", info["watchdog_log"]);
    assert!(gone >= Duration::from_secs(20), "not before the idle grace: {gone:?}");
    let log = lines(&info, "watchdog_log");
    let seen = log.iter().position(|l| connected(l)).unwrap();
    assert!(log[seen..].iter().any(|l| l.contains("ssh connections=0")), "{log:#?}");
    let console = lines(&info, "console").join("\n");
    assert!(console.contains("Timeout, client not responding"), "sshd's probes dropped the client");
    user.run(&["terminate", &session]).success();
    // Purging the standing parts is an account admin's (daily + bootstrap policy).
    cloud.enforce(&crate::support::cloud::admin_policy());
    user.run(&["cleanup", "--purge", "-q"]).success();
    assert_nothing_left(&cloud);
}

/// Lifecycle 3: The cap: a box whose watchdog never starts (masked on the kernel command line) still
/// powers off at launch + max_runtime_cap, by the timer the user-data arms at boot, even with
/// a deadline tag set far past the cap.
#[test]
#[ignore = "real-box tier (QEMU): scripts/test runs it"]
fn a_box_whose_watchdog_never_starts_powers_off_at_the_cap_whatever_the_tag_says() {
    let cloud = LocalCloud::start_real_vm();
    cloud.control(
        "PUT",
        "box-config",
        Some(json!({ "vm_kernel_args": "systemd.mask=ephemeral-admin-watchdog.service" })),
    );
    // The cap leaves room for `launch --detach`'s first connection (sshd after about 40 s under
    // TCG, then the host-key rotation) to end before it.
    let user = user(&cloud, "boot_grace = \"10m\"\nidle_grace = \"10m\"\nmax_runtime_cap = \"120s\"\n");
    let launched = Instant::now();
    // The deadline is the cap itself: the scheduled deadline (1 min after it) must come second.
    let (_, instance) = launch_detached(&user, &["--max-runtime", "2m"]);
    cloud.retag(&instance, "ephemeral-admin:expires-at", &rfc3339_in(3600));
    wait_terminated(&cloud, &instance, Duration::from_secs(120 + 180));
    let at = launched.elapsed();
    assert!(at >= Duration::from_secs(118), "not before the cap: {at:?}");
    let info = box_info(&cloud, &instance);
    assert_eq!(info["poweroff_reason"], "cap-fallback", "{:#}", info["notes"]);
    assert!(lines(&info, "watchdog_log").is_empty(), "the watchdog never ran");
}
