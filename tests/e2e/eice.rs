//! `connect = "eice"`: the box has no public IP and no rule for the caller; SSH runs through the
//! local cloud's EC2 Instance Connect Endpoint (a ws:// relay that verifies the SigV4 query
//! signature, the VPC and the groups, then pipes to the box simulator's sshd). `setup eice`
//! makes the endpoint (progress, idempotent), `doctor` reports it, `cleanup --purge` removes it.
//! The endpoint closing a tunnel at its maximum duration (forced to seconds here) goes unnoticed
//! by a command and a plain shell (the SSH stream resumes through the box's relay on a new
//! tunnel); a box reached without the relay keeps `--tmux` work by reattaching.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::lifecycle::{login, wait_until};
use crate::session::{BOX_TMUX, Tmux, assert_nothing_left, box_tmux_attached};
use crate::support::{LocalCloud, User};

/// A user whose tunnels dial the local cloud's ws:// listener (the signed Host stays the DnsName).
fn eice_user(cloud: &LocalCloud) -> User {
    let ws = cloud.control("GET", "eice", None)["ws_url"].as_str().unwrap().to_string();
    User::new(cloud).env("EPHEMERAL_ADMIN_EICE_ENDPOINT_URL", &ws)
}

fn endpoints(cloud: &LocalCloud) -> Vec<Value> {
    cloud.state()["instance_connect_endpoints"].as_array().cloned().unwrap_or_default()
}

fn tunnels(cloud: &LocalCloud) -> Vec<Value> {
    cloud.control("GET", "eice", None)["tunnels"].as_array().cloned().unwrap_or_default()
}

/// `setup eice` (2 s of create-in-progress); answers the endpoint's JSON.
fn setup(cloud: &LocalCloud, user: &User) -> Value {
    cloud.control("PUT", "eice", Some(json!({"create_seconds": 2})));
    let run = user.run(&["setup", "eice", "--output", "json"]).success();
    run.json()["endpoint"].clone()
}

/// `launch --connect eice --detach`: no --my-ip, no proxy command.
fn launch_detached(user: &User) -> Value {
    user.run(&["launch", "--connect", "eice", "--user", login(), "--detach", "--output", "json"])
        .success()
        .json()
}

/// `cleanup --purge` removes the endpoint and its group; then nothing at all is left.
fn purge_and_check(cloud: &LocalCloud, user: &User) {
    // Purging the standing parts is an account admin's: the daily and the bootstrap policy.
    cloud.enforce(&crate::support::cloud::admin_policy());
    let run = user.run(&["cleanup", "--purge", "--output", "json"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let purged = run.json()["purged"].to_string();
    assert!(purged.contains("EC2 Instance Connect Endpoint eice-"), "{purged}");
    assert!(purged.contains("security group ephemeral-admin-eice-"), "{purged}");
    let live: Vec<Value> = endpoints(cloud).into_iter().filter(|e| e["state"] != "delete-complete").collect();
    assert!(live.is_empty(), "endpoints left: {live:#?}");
    assert_nothing_left(cloud);
}

/// "… at $0.0058/h, at most $0.0267 for 4h" in a launch's stderr: (price per hour, estimate).
fn estimate_line(stderr: &str) -> (f64, f64) {
    let line = stderr.lines().find(|l| l.contains("/h, at most $")).unwrap_or_else(|| panic!("{stderr}"));
    let number = |after: &str| -> f64 {
        let rest = &line[line.find(after).unwrap() + after.len()..];
        rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
    };
    (number(" at $"), number("at most $"))
}

#[test]
fn setup_eice_creates_one_tagged_endpoint_with_progress_and_a_second_run_changes_nothing() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    // Before: doctor says none exists (not a failure in the default public-ip mode).
    let doctor = user.run(&["doctor", "--output", "json"]).json();
    let check = doctor["checks"].as_array().unwrap().iter().find(|c| c["name"] == "eice").unwrap().clone();
    assert!(check["detail"].as_str().unwrap().starts_with("none in vpc-"), "{check}");
    cloud.control("PUT", "eice", Some(json!({"create_seconds": 3})));
    let first = user.run(&["setup", "eice"]).success();
    assert!(first.stderr.contains("create-in-progress"), "a progress line with the state:\n{}", first.stderr);
    assert!(first.stderr.contains("elapsed"), "and the elapsed time:\n{}", first.stderr);
    assert!(first.stdout.contains("created EC2 Instance Connect Endpoint eice-"), "{}", first.stdout);
    let made = endpoints(&cloud);
    assert_eq!(made.len(), 1, "{made:#?}");
    assert_eq!(made[0]["state"], "create-complete");
    assert_eq!(made[0]["tags"]["Project"], "EphemeralContainer");
    assert_eq!(made[0]["tags"]["Name"], "ephemeral-admin-eice");
    let groups = crate::launch::own_groups(&cloud.state());
    let group = groups.iter().find(|g| made[0]["security_group_ids"][0] == g["id"]).expect("its own group");
    assert!(group["name"].as_str().unwrap().starts_with("ephemeral-admin-eice-"), "{group}");
    // A way in, not out: egress only to sshd, inside the VPC.
    let mut egress: Vec<(String, u64, String)> = group["egress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["protocol"].to_string(), r["from_port"].as_u64().unwrap_or(0), r["cidr_ipv4"].to_string())
        })
        .collect();
    egress.sort();
    let vpc_cidr = "\"172.31.0.0/16\"".to_string();
    let tcp = "\"tcp\"".to_string();
    assert_eq!(egress, vec![(tcp, 22, vpc_cidr)], "{group}");

    cloud.clear_log();
    let again = user.run(&["setup", "eice", "--output", "json"]).success().json();
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["endpoint"]["id"], made[0]["id"]);
    assert_eq!(endpoints(&cloud).len(), 1);
    assert_eq!(cloud.count("CreateInstanceConnectEndpoint") + cloud.count("CreateSecurityGroup"), 0);

    let doctor = user.env("EPHEMERAL_ADMIN_CONNECT", "eice").run(&["doctor", "--output", "json"]).json();
    let check = doctor["checks"].as_array().unwrap().iter().find(|c| c["name"] == "eice").unwrap().clone();
    assert_eq!(check["ok"], true, "{check}");
    assert!(check["detail"].as_str().unwrap().contains(made[0]["id"].as_str().unwrap()), "{check}");
    purge_and_check(&cloud, &user);
}

#[test]
fn a_launch_in_eice_mode_without_an_endpoint_makes_nothing_and_names_setup_eice() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    cloud.clear_log();
    let run = user.run(&["launch", "--connect", "eice", "--user", login(), "--", "true"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("`ephemeral-admin setup eice` creates one"), "{}", run.stderr);
    let creates: Vec<String> = cloud
        .actions()
        .into_iter()
        .filter(|a| a.starts_with("Create") || a.starts_with("Run") || a.starts_with("Authorize"))
        .collect();
    assert!(creates.is_empty(), "nothing is made: {creates:?}");
}

#[test]
fn an_eice_box_has_no_public_ip_no_caller_rule_and_runs_a_command_and_connect() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    let endpoint = setup(&cloud, &user);
    cloud.clear_log();
    // No --my-ip and no IP echo service reachable: an eice launch never asks who we are.
    let user = user.env("EPHEMERAL_ADMIN_IP_SERVICES", "http://127.0.0.1:9/");
    let run =
        user.run(&["launch", "--connect", "eice", "--user", login(), "--", "sh", "-c", "echo via-$((20+1))"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("via-21"), "{}", run.stdout);
    // No public IPv4 address, so no IPv4 charge: in the estimate, and in the ledger line.
    let (price, most) = estimate_line(&run.stderr);
    let ebs = 8.0 * 0.08 / 730.0 * 4.0;
    assert!((most - (price * 4.0 + ebs)).abs() < 0.0002, "compute and EBS only: {}", run.stderr);
    let ledger = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap();
    let line: Value = serde_json::from_str(ledger.lines().last().unwrap()).unwrap();
    assert_eq!(line["cost"]["ipv4"], 0.0, "{line}");
    let calls = cloud.calls();
    let run_instances: Vec<&Value> = calls.iter().filter(|c| c["action"] == "RunInstances").collect();
    assert!(!run_instances.is_empty());
    for call in &run_instances {
        assert_eq!(call["params"]["NetworkInterface.1.AssociatePublicIpAddress"], "false", "{call}");
    }
    let rules: Vec<&Value> =
        calls.iter().filter(|c| c["action"] == "AuthorizeSecurityGroupIngress").collect();
    assert_eq!(rules.len(), 1, "one rule, from the endpoint's group: {rules:#?}");
    let params = rules[0]["params"].as_object().unwrap();
    assert!(!params.keys().any(|k| k.contains("CidrIp")), "no address rule at all: {params:?}");
    assert_eq!(params["IpPermissions.1.Groups.1.GroupId"], endpoint["security_group_ids"][0]);
    assert_eq!(params["IpPermissions.1.FromPort"], "22", "sshd only: {params:?}");
    assert!(!params.contains_key("IpPermissions.2.FromPort"), "nothing but sshd: {params:?}");
    let carried: Vec<Value> = tunnels(&cloud)
        .into_iter()
        .filter(|t| t["refused"].is_null() && t["bytes_out"].as_u64().unwrap_or(0) > 0)
        .collect();
    assert!(!carried.is_empty(), "{:#?}", tunnels(&cloud));
    assert!(carried.iter().all(|t| t["remote_port"] == "22"), "to sshd only: {carried:#?}");

    // A kept box: launched detached, reached again with `connect -- CMD`.
    let out = launch_detached(&user);
    assert!(out["public_ip"].is_null(), "no public IP: {out}");
    let session = out["session_id"].as_str().unwrap();
    let run = user.run(&["connect", session, "--", "sh", "-c", "echo again-$((40+2))"]).success();
    assert!(run.stdout.contains("again-42"), "{}", run.stdout);
    user.run(&["terminate", session]).success();
    purge_and_check(&cloud, &user);
}

#[test]
fn a_tampered_signature_is_refused_with_403_and_one_line_naming_the_permission() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    let out = launch_detached(&user);
    let session = out["session_id"].as_str().unwrap();
    // The local cloud's API does not check signatures; its EICE endpoint does, as AWS's.
    let tampered = user.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let run = tampered.run(&["connect", session, "--", "true"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("refused the tunnel (HTTP 403"), "{}", run.stderr);
    assert!(run.stderr.contains("ec2-instance-connect:OpenTunnel"), "{}", run.stderr);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {}", run.stderr);
    let refused: Vec<Value> = tunnels(&cloud).into_iter().filter(|t| !t["refused"].is_null()).collect();
    assert_eq!(refused.len(), 1, "refused once, not retried: {refused:#?}");
    assert!(refused[0]["refused"].as_str().unwrap().contains("signature"), "{refused:#?}");
    user.run(&["terminate", session]).success();
    purge_and_check(&cloud, &user);
}

/// Tunnels the endpoint closed normally (at their maximum duration) to `port`.
fn closed_tunnels(cloud: &LocalCloud, port: u64) -> usize {
    tunnels(cloud)
        .iter()
        .filter(|t| t["close_code"] == 1000 && t["remote_port"] == port.to_string().as_str())
        .count()
}

#[test]
fn a_command_and_a_shell_ride_out_closed_tunnels_without_noticing() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    let out = launch_detached(&user);
    let session = out["session_id"].as_str().unwrap().to_string();
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 2})));

    // A command that outlives three tunnels, with 2 MiB on its stdin: every line once and in
    // order, stdin intact, its own exit status, and not a word on stderr.
    let before = closed_tunnels(&cloud, 22);
    let script = "n=0; while [ $n -lt 12 ]; do n=$((n+1)); echo line-$n; sleep 0.6; done; \
                  echo stdin-$(sha256sum | cut -c1-16); exit 7";
    let mut child = user
        .command(&["connect", &session, "--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &sent).unwrap());
    let done = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&done.stdout), String::from_utf8_lossy(&done.stderr));
    assert_eq!(done.status.code(), Some(7), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let expected: Vec<String> = (1..=12).map(|n| format!("line-{n}")).collect();
    assert_eq!(&lines[..12], expected.as_slice(), "{stdout}");
    let sha = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut sha_in = sha.stdin.as_ref().unwrap();
    std::io::Write::write_all(&mut sha_in, &data).unwrap();
    let sum = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(lines[12], format!("stdin-{}", &sum[..16]), "{stdout}");
    assert_eq!(lines.len(), 13, "{stdout}");
    assert!(
        stderr.lines().all(|l| l.starts_with("waiting for ssh on ")),
        "the user notices nothing: {stderr}"
    );
    let closed = closed_tunnels(&cloud, 22) - before;
    assert!(closed >= 2, "the command outlived {closed} closed tunnels: {:#?}", tunnels(&cloud));

    // A plain shell (no tmux): what it was told before the tunnels closed, it still knows after.
    shell_rides_out_closed_tunnels(&cloud, &user, &session);
    user.run(&["terminate", &session]).success();
    purge_and_check(&cloud, &user);
}

/// `connect SESSION` in a terminal: a variable set in the box's shell, two tunnels closed by the
/// endpoint, the variable still there, and no line about it on the screen; then `exit` leaves.
fn shell_rides_out_closed_tunnels(cloud: &LocalCloud, user: &User, session: &str) {
    let tmux = Tmux::start(user, 120, 30);
    tmux.wait_for("local$", Duration::from_secs(10));
    tmux.line(&format!("ephemeral-admin connect {session}"));
    tmux.wait_for("left until", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("export MARK=kept-$((6*7)); echo set-$MARK");
    tmux.wait_for("set-kept-42", Duration::from_secs(20));
    let before = closed_tunnels(cloud, 22);
    wait_until("two tunnels closed under the shell", Duration::from_secs(30), || {
        closed_tunnels(cloud, 22) >= before + 2
    });
    tmux.line("echo mark=$MARK");
    tmux.wait_for("mark=kept-42", Duration::from_secs(20));
    let screen = tmux.screen();
    assert!(!screen.contains("tunnel") && !screen.contains("local$ echo mark"), "never left:\n{screen}");
    tmux.line("exit");
    tmux.wait_for("local$", Duration::from_secs(20));
}

#[test]
fn a_box_reached_without_its_resume_relay_keeps_tmux_across_tunnels_and_says_what_ends() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    let out = launch_detached(&user);
    let session = out["session_id"].as_str().unwrap().to_string();
    user.run(&["connect", &session, "--", "true"]).success();
    // As recorded by a version without the relay: straight to sshd, one tunnel per connection.
    forget_resume_port(&user, &session);
    let instance = out["instance_id"].as_str().unwrap().to_string();
    let relay_streams = || {
        let info = cloud.control("GET", &format!("box/{instance}"), None);
        let log = info["resume_log"].as_array().cloned().unwrap_or_default();
        log.iter().filter(|l| l.as_str().unwrap_or("").contains(" new from")).count()
    };
    let launched = relay_streams();
    assert!(launched >= 1, "a connect with the record intact went through the relay");
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 6})));

    // Shorter than the limit: unaffected. Longer: lost (255), saying why and what survives it.
    let run = user.run(&["connect", &session, "--", "sh", "-c", "sleep 2; echo short-done"]).success();
    assert!(run.stdout.contains("short-done"), "{}", run.stdout);
    let run = user.run(&["connect", &session, "--", "sleep", "30"]);
    assert_eq!(run.code, 255, "{}", run.stderr);
    assert!(run.stderr.contains("maximum duration"), "{}", run.stderr);
    assert!(run.stderr.contains("--tmux"), "{}", run.stderr);

    // --tmux: the endpoint ends the tunnel; the client reattaches on a new one by itself, and
    // its -L forward (here to the box's own sshd, as the box sees it) works on the new connection.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let private_ip = out["private_ip"].as_str().unwrap();
    let line = format!("ephemeral-admin connect {session} --tmux -L {port}:{private_ip}:22");
    rides_out_closed_tunnels(&cloud, &user, &line, &|| {
        let mut banner = [0u8; 8];
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the -L port is open");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Read::read_exact(&mut stream, &mut banner).expect("an answer through the forward");
        assert_eq!(&banner, b"SSH-2.0-", "sshd's banner through -L on the new connection");
    });
    assert_eq!(relay_streams(), launched, "no stream through the relay after the record lost it");
    user.run(&["terminate", &session]).success();
    purge_and_check(&cloud, &user);
}

#[test]
fn a_box_whose_relay_never_answers_is_reached_straight_after_a_third_of_the_wait_with_a_warning() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    // As if the image had no python3: nothing listens on port 2022.
    cloud.control("PUT", "box-config", Some(json!({"resume_relay": false})));
    user.write_config("connect_timeout = \"15s\"\n");
    let run = user.run(&[
        "launch",
        "--connect",
        "eice",
        "--user",
        login(),
        "--",
        "sh",
        "-c",
        "echo straight-$((6*7))",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("straight-42"), "{}", run.stdout);
    let warned: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning:") && l.contains("resume relay did not answer"))
        .collect();
    assert_eq!(warned.len(), 1, "one line saying what it means: {}", run.stderr);
    assert!(warned[0].contains("--tmux"), "{}", run.stderr);
    assert!(tunnels(&cloud).iter().all(|t| t["remote_port"] == "22"), "sshd only: {:#?}", tunnels(&cloud));
    purge_and_check(&cloud, &user);
}

#[test]
fn openssh_through_ssh_config_rides_out_closed_tunnels_via_the_binary_as_its_proxy_command() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    let out = launch_detached(&user);
    let session = out["session_id"].as_str().unwrap().to_string();
    let block = user.run(&["ssh-config", &session]).success().stdout;
    let proxy = block
        .lines()
        .find(|l| l.trim_start().starts_with("ProxyCommand "))
        .unwrap_or_else(|| panic!("{block}"));
    assert!(
        proxy.contains(env!("CARGO_BIN_EXE_ephemeral-admin"))
            && proxy.ends_with(&format!(" proxy {session}")),
        "{proxy}"
    );
    assert!(!block.contains("aws ec2-instance-connect"), "no AWS CLI needed: {block}");
    let config = user.home.join("eice_ssh_config");
    std::fs::write(&config, &block).unwrap();
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 2})));
    let before = closed_tunnels(&cloud, 22);
    // OpenSSH's own client, with the CLI's environment (the ProxyCommand is the CLI).
    let done = user
        .wrapper("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-o", "BatchMode=yes", &format!("ephemeral-admin-{session}")])
        .arg("n=0; while [ $n -lt 10 ]; do n=$((n+1)); echo tick-$n; sleep 0.6; done; exit 5")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&done.stdout), String::from_utf8_lossy(&done.stderr));
    assert_eq!(done.status.code(), Some(5), "{stdout}\n{stderr}");
    let expected: Vec<String> = (1..=10).map(|n| format!("tick-{n}")).collect();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stderr}");
    assert!(stderr.trim().is_empty(), "nothing from the proxy: {stderr}");
    let closed = closed_tunnels(&cloud, 22) - before;
    assert!(closed >= 2, "ssh outlived {closed} closed tunnels: {:#?}", tunnels(&cloud));
    user.run(&["terminate", &session]).success();
    purge_and_check(&cloud, &user);
}

/// Removes `resume_port` from the session's local record.
fn forget_resume_port(user: &User, session: &str) {
    let mut stack = vec![user.state_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with(format!("{session}/session.toml")) {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.contains("resume_port = 2022"), "{text}");
                let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("resume_port")).collect();
                std::fs::write(&path, kept.join("\n") + "\n").unwrap();
                return;
            }
        }
    }
    panic!("no record for {session}");
}

#[test]
fn launch_tmux_in_eice_mode_also_rides_out_a_closed_tunnel() {
    let cloud = LocalCloud::start();
    let user = eice_user(&cloud);
    setup(&cloud, &user);
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 8})));
    let line = format!("ephemeral-admin launch --connect eice --tmux --user {}", login());
    rides_out_closed_tunnels(&cloud, &user, &line, &|| {});
    // --tmux implies --keep: the session is still there, to end by hand.
    let listed = user.run(&["list", "--output", "json"]).success().json();
    let session = listed["sessions"][0]["session_id"].as_str().unwrap().to_string();
    user.run(&["terminate", &session]).success();
    purge_and_check(&cloud, &user);
}

/// Types `command_line` (a `--tmux` launch or connect) in a terminal, sets a variable in the
/// box's tmux, waits for the endpoint to close the tunnel, and checks that without a keystroke a
/// new tunnel carries a reattached tmux that still has the variable, then runs `after` (checks on
/// the new connection); then leaves.
fn rides_out_closed_tunnels(cloud: &LocalCloud, user: &User, command_line: &str, after: &dyn Fn()) {
    let _turn = BOX_TMUX.lock().unwrap_or_else(|p| p.into_inner());
    let kill = || {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", "ephemeral-admin"])
            .stderr(Stdio::null())
            .status();
    };
    kill();
    let tmux = Tmux::start(user, 120, 30);
    tmux.wait_for("local$", Duration::from_secs(10));
    tmux.line(command_line);
    wait_until("a client on the box's tmux session", Duration::from_secs(60), box_tmux_attached);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("export MARK=kept-$((6*7))");
    let closed = |cloud: &LocalCloud| tunnels(cloud).iter().filter(|t| t["close_code"] == 1000).count();
    let before = closed(cloud);
    wait_until("the endpoint to close the tunnel", Duration::from_secs(30), || closed(cloud) > before);
    // No keystroke: a new tunnel opens and tmux is attached again.
    let opened = tunnels(cloud).len();
    wait_until("a new tunnel", Duration::from_secs(30), || tunnels(cloud).len() > opened);
    wait_until("tmux reattached", Duration::from_secs(30), box_tmux_attached);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("echo mark=$MARK");
    tmux.wait_for("mark=kept-42", Duration::from_secs(20));
    after();
    let screen = tmux.screen();
    assert!(
        !screen.contains("left session") && !screen.contains("local$ echo mark"),
        "never left:\n{screen}"
    );
    // Leave on purpose: once a long tunnel carries the connection (a detach racing a tunnel's
    // end would just be reattached), the box's tmux lets its client go and the CLI leaves.
    cloud.control("PUT", "eice", Some(json!({"tunnel_limit_seconds": 3600})));
    let opened = tunnels(cloud).len();
    wait_until("a long tunnel", Duration::from_secs(30), || tunnels(cloud).len() > opened);
    wait_until("tmux reattached", Duration::from_secs(30), box_tmux_attached);
    let ok = Command::new("tmux").args(["detach-client", "-s", "ephemeral-admin"]).status().unwrap();
    assert!(ok.success(), "the box's tmux has a client to detach");
    tmux.wait_for("left session", Duration::from_secs(30));
    kill();
}
