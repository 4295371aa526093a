//! A CLI that never crashes, never hangs, and says what to do next: closed pipes, hung-up
//! terminals, missing credentials, unreachable endpoints, AWS errors the SDK does not model, and
//! the flags and messages a new user trips over. The pipe cases race the reader against the
//! writer, so each runs many times.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

const BIN: &str = env!("CARGO_BIN_EXE_ephemeral-admin");

/// Runs `script` under `bash -o pipefail` `n` times with the user's environment; returns each
/// run's (exit code, stderr).
fn pipelines(user: &User, script: &str, n: usize) -> Vec<(i32, String)> {
    (0..n)
        .map(|_| {
            let out =
                user.wrapper("bash").args(["-o", "pipefail", "-c", script]).env("BIN", BIN).output().unwrap();
            (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
        })
        .collect()
}

#[track_caller]
fn assert_all_quiet_successes(runs: &[(i32, String)], what: &str) {
    for (code, stderr) in runs {
        assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
        assert_eq!(*code, 0, "{what}: exit {code}:\n{stderr}");
    }
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    let user = User::offline();
    for (script, what) in [
        (r#""$BIN" policy | head -n 1 >/dev/null"#, "policy | head -1"),
        (r#""$BIN" completions bash | head -n 1 >/dev/null"#, "completions bash | head -1"),
        (r#""$BIN" launch --help | head -n 1 >/dev/null"#, "launch --help | head -1"),
    ] {
        assert_all_quiet_successes(&pipelines(&user, script, 50), what);
    }
}

/// A pipe whose reader is closed before the program writes: EPIPE on the first write, every time.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe {
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    }
}

#[test]
fn closed_stdout_and_stderr_end_quietly_with_the_right_status() {
    let user = User::offline();
    let out = user.command(&["policy"]).stdout(closed_pipe()).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // An error whose message cannot be printed still exits with its own code, not 101.
    let out = user.command(&["status", "abcd1234"]).stdout(Stdio::null()).stderr(closed_pipe()).output();
    assert_eq!(out.unwrap().status.code(), Some(2));
}

#[test]
fn connect_returns_at_once_when_its_reader_goes_away() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();
    // `timeout` only stops a hang; the assertion is on what the pipeline returned.
    let script = format!(r#"timeout 30 "$BIN" connect {id} -- yes | head -n 1"#);
    for (code, stderr) in pipelines(&user, &script, 50) {
        assert_ne!(code, 124, "connect -- yes | head -1 hung:\n{stderr}");
        // Like `yes | head -1` locally: the remote side ends by SIGPIPE, 128 + 13.
        assert_eq!(code, 141, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    user.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}

/// Opens a pseudo-terminal; returns (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    let ok = unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(ok, 0);
    // Close-on-exec: a copy of the master in any child (the CLI itself included) would keep the
    // terminal from ever hanging up.
    for fd in [master, slave] {
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }, 0);
    }
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn a_terminal_that_hangs_up_still_tears_everything_down() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let (master, slave) = pty();
    let mut cmd = user.command(&attached_args(&proxy, &["--", "sleep", "60"]));
    cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave);
    // The CLI leads its own session with the pty as its controlling terminal, like a login shell's
    // job: closing the master is the terminal window going away (SIGHUP, then EIO on writes).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copies of the slave
    // Drain the terminal as we wait, so the CLI never blocks on a full pty buffer. The master
    // must have no other copy: closing it below is the hang-up.
    let mut screen = Vec::new();
    wait_until("the remote command to run", Duration::from_secs(60), || {
        drain(&master, &mut screen);
        crate::session::logged_in(&cloud)
    });
    drain(&master, &mut screen);
    drop(master);
    let status = wait_with_limit(&mut child, Duration::from_secs(60));
    assert_eq!(status, Some(129), "a hung-up terminal ends with 128 + SIGHUP");
    assert_nothing_left(&cloud);
    let ledger = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap();
    assert!(ledger.contains("\"ended_by\":\"interrupted\""), "{ledger}");
}

fn drain(master: &OwnedFd, into: &mut Vec<u8>) {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4096];
    loop {
        let n = unsafe {
            let mut fds = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            if libc::poll(&mut fds, 1, 0) <= 0 {
                return;
            }
            libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n <= 0 {
            return;
        }
        into.extend_from_slice(&buf[..n as usize]);
    }
}

fn wait_with_limit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the CLI did not end within {limit:?} after the terminal hung up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A user whose environment has no AWS credentials at all.
fn without_credentials(user: &User, args: &[&str]) -> (i32, String, String) {
    let out = user
        .command(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_credentials_are_one_line_with_the_fix() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    let (code, _, stderr) = without_credentials(&user, &["list"]);
    assert_eq!(code, 2, "no credentials is the environment's fault, nothing was made: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.contains("no AWS credentials") && stderr.contains("aws configure"), "{stderr}");
    assert!(stderr.contains("AWS_PROFILE") && stderr.contains("aws sso login"), "{stderr}");
    assert!(stderr.len() < 300, "{} bytes: {stderr}", stderr.len());
    let (_, _, verbose) = without_credentials(&user, &["-v", "list"]);
    assert!(
        verbose.contains("caused by: ") && verbose.contains("no credentials found in chain"),
        "{verbose}"
    );

    let (code, stdout, stderr) = without_credentials(&user, &["doctor", "--output", "json"]);
    assert_eq!(code, 2, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for check in report["checks"].as_array().unwrap() {
        let fix = check["fix"].as_str().unwrap_or_default();
        assert!(!fix.contains("--ami") && !fix.contains("network"), "advice that misleads: {check}");
        match check["name"].as_str().unwrap() {
            "credentials" => assert!(fix.contains("aws configure"), "{check}"),
            "config" => assert_eq!(check["ok"], true),
            _ => assert_eq!(check["skipped"], true, "{check}"),
        }
    }
}

#[test]
fn an_unreachable_endpoint_is_one_line_naming_it() {
    let user = User::offline().env("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let run = user.run(&["list"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("no answer from http://127.0.0.1:9"), "{}", run.stderr);
    assert!(run.stderr.contains("--endpoint-url"), "{}", run.stderr);
}

#[test]
fn an_aws_error_the_sdk_does_not_model_is_one_line_with_the_missing_permission() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // The denial arrives while CreateSecurityGroup is still on its way (as on a slow link): the
    // group made for the session must go all the same.
    cloud.rules(json!([{ "action": "CreateSecurityGroup", "delay_ms": 600 }, {
        "service": "ssm", "action": "GetParameter", "error": "AccessDeniedException", "status": 400,
        "message": "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: ssm:GetParameter on resource: arn:aws:ssm:us-east-1::parameter/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id because no identity-based policy allows the ssm:GetParameter action"
    }]));
    let run = user.run(&attached_args(&proxy(&cloud), &["--detach"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap();
    assert!(last.starts_with("error: "), "{}", run.stderr);
    assert!(last.contains("AccessDeniedException (ssm:GetParameter)"), "{last}");
    assert!(last.contains("`ephemeral-admin policy`"), "{last}");
    for noise in ["unhandled error", "aws_request_id", "HttpResponse", "service error"] {
        assert!(!run.stderr.contains(noise), "{noise} in:\n{}", run.stderr);
    }
    // A request the CLI stopped waiting for still lands: give it the time to.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_nothing_left(&cloud);
}

#[test]
fn flags_and_ids_say_what_they_mean() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // A flag beats the file `init` wrote.
    user.run(&["init"]).success();
    let run = user.run(&["init"]);
    assert_eq!(run.code, 2, "init over an existing file: {}", run.stderr);
    let prices = user.run(&["prices", "--instance-type", "m5.large", "--output", "json"]).success();
    let text = prices.stdout;
    assert!(text.contains("m5.large") && !text.contains("t3.small"), "{text}");
    // `--yes` answered no question: it is gone.
    assert_eq!(user.run(&["launch", "--yes"]).code, 2);
    // Ids: say which characters they use; an instance id works too; unknown ids are errors.
    let run = user.run(&["status", "abcd1234"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("a-z and 2-9, without i, l, o, 0 and 1"), "{}", run.stderr);
    let run = user.run(&["cleanup", "zzzzzzzz"]);
    assert_ne!(run.code, 0);
    assert!(run.stdout.contains("no session zzzzzzzz"), "{}", run.stdout);

    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();
    let instance = session["instance_id"].as_str().unwrap();
    let status = user.run(&["status", instance, "--output", "json"]).success().json();
    assert_eq!(status["session_id"], id);
    // Timings and money, as JSON readers want them.
    assert!(session["timings_ms"].is_object(), "{}", session["timings_ms"]);
    let cost = user.run(&["cost", "--output", "json"]).success();
    assert!(!cost.stdout.contains("-0.0"), "{}", cost.stdout);
    let cost = cost.json();
    for s in cost["sessions"].as_array().unwrap() {
        assert!(s.get("launched_at").is_some() && s.get("start").is_none(), "{s}");
        let c = s["cost"].as_f64().unwrap();
        assert_eq!(c, (c * 1e4).round() / 1e4, "rounded as the text shows it: {s}");
    }
    assert!(!user.run(&["cost"]).success().stdout.contains("$-"));

    // extend --until earlier shortens only when asked.
    let expires = session["expires_at"].as_str().unwrap();
    let earlier = time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .unwrap()
        - time::Duration::hours(1);
    let earlier = earlier.format(&time::format_description::well_known::Rfc3339).unwrap();
    let run = user.run(&["extend", id, "--until", &earlier]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--shorten"), "{}", run.stderr);
    let done =
        user.run(&["extend", id, "--until", &earlier, "--shorten", "--output", "json"]).success().json();
    assert!(done["added_seconds"].as_i64().unwrap() < 0, "{done}");

    // terminate twice: the second repeats the removals instead of giving up.
    user.run(&["terminate", instance]).success();
    let again = user.run(&["terminate", id]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(!again.stdout.contains("already"), "{}", again.stdout);
    let status = user.run(&["status", id]).success();
    assert!(status.stdout.contains("ended") && status.stdout.contains("terminate"), "{}", status.stdout);
    assert_nothing_left(&cloud);
}

#[test]
fn help_shows_examples_and_keeps_global_flags_apart() {
    let user = User::offline();
    for command in [
        "launch",
        "connect",
        "cp",
        "extend",
        "list",
        "status",
        "terminate",
        "cleanup",
        "doctor",
        "prices",
        "cost",
        "ssh-config",
        "policy",
        "init",
        "completions",
    ] {
        let help = user.run(&[command, "--help"]).success().stdout;
        assert!(help.contains("Examples:\n  ephemeral-admin"), "{command}:\n{help}");
        assert!(help.contains("Global options:"), "{command}:\n{help}");
        let own = help.split("Global options:").next().unwrap();
        assert!(!own.contains("--endpoint-url"), "{command}: global flags mixed in:\n{help}");
    }
    let launch = user.run(&["launch", "--help"]).success().stdout;
    for default in ["[default: 4h", "[default: 2m]", "[default: t3.small,"] {
        assert!(launch.contains(default), "{default}:\n{launch}");
    }
}

#[test]
fn a_rejected_key_suggests_the_login_user_and_is_a_failed_launch() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let args =
        ["launch", "--my-ip", "203.0.113.7", "--user", "nosuchuser", "--proxy-command", &proxy, "--", "true"];
    let run = user.run(&args);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("--user"), "{}", run.stderr);
    let ledger = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap();
    assert!(ledger.contains("\"ended_by\":\"launch-failed\""), "{ledger}");
    assert_nothing_left(&cloud);
}

#[test]
fn exit_codes_for_a_broken_environment_are_2() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud).env("EPHEMERAL_ADMIN_IP_SERVICES", "http://127.0.0.1:9/");
    let run = user.run(&["launch", "--detach"]);
    assert_eq!(run.code, 2, "IP detection failed: {}", run.stderr);
    assert!(run.stderr.contains("--my-ip"), "{}", run.stderr);
    assert_eq!(cloud.count("RunInstances"), 0);
    let run = user.run(&["launch", "--detach", "--my-ip", "0.0.0.0/0"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--allow-cidr"), "{}", run.stderr);
}

#[test]
fn ctrl_c_on_a_terminal_clears_the_spinner_and_says_one_thing() {
    let cloud = LocalCloud::start();
    cloud.config(json!({ "pending_seconds": 30 }));
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let (master, slave) = pty();
    // stderr is a terminal: spinners are on, as for a person.
    let mut cmd = user.command(&attached_args(&proxy, &["--", "true"]));
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(slave);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut screen = Vec::new();
    wait_until("RunInstances", Duration::from_secs(60), || {
        drain(&master, &mut screen);
        cloud.count("RunInstances") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let start = std::time::Instant::now();
    let status = loop {
        drain(&master, &mut screen);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "Ctrl-C did not end the launch");
        std::thread::sleep(Duration::from_millis(50));
    };
    drain(&master, &mut screen);
    assert_eq!(status.code(), Some(130));
    let text = String::from_utf8_lossy(&screen);
    // What is left on screen after the last line clear: the one message, no spinner.
    let after_clear = text.rsplit("\x1b[2K").next().unwrap();
    assert!(after_clear.contains("error: interrupted"), "{text:?}");
    assert!(
        !after_clear.contains("starting") && !after_clear.contains("requesting"),
        "spinner left: {after_clear:?}"
    );
    assert_eq!(text.matches("interrupted").count(), 1, "one message: {text:?}");
    assert_nothing_left(&cloud);
}
