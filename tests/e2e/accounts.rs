//! Local state belongs to (partition, account, region): a second AWS account on the same
//! machine never settles, sweeps or deletes the keys of the first one's sessions.

use std::process::Command;

use crate::session::{assert_nothing_left, launch_detached, proxy};
use crate::support::cloud::python;
use crate::support::{LocalCloud, User};

/// Credentials for a role in another account, from STS AssumeRole (which moto supports): the
/// user's same machine and HOME, another profile.
fn other_account(cloud: &LocalCloud, user: &User, account: &str) -> User {
    let script = "import boto3, sys\n\
        sts = boto3.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                           aws_access_key_id='other', aws_secret_access_key='other')\n\
        c = sts.assume_role(RoleArn=f'arn:aws:iam::{sys.argv[2]}:role/admin', RoleSessionName='dev')['Credentials']\n\
        print(c['AccessKeyId'], c['SecretAccessKey'], c['SessionToken'])\n";
    let out = Command::new(python()).args(["-c", script, &cloud.url, account]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let parts: Vec<&str> = text.split_whitespace().collect();
    user.env("AWS_ACCESS_KEY_ID", parts[0])
        .env("AWS_SECRET_ACCESS_KEY", parts[1])
        .env("AWS_SESSION_TOKEN", parts[2])
}

#[test]
fn a_second_account_never_touches_the_first_ones_sessions() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();
    let key = user.state_dir().join(format!("sessions/{id}/id_ed25519"));
    assert!(key.exists());

    let other = other_account(&cloud, &user, "222222222222");
    let whoami = other.run(&["doctor", "--output", "json"]).json();
    assert!(whoami["checks"][0]["detail"].as_str().unwrap().contains("222222222222"), "{whoami}");
    let listed = other.run(&["list", "--output", "json"]).success().json();
    assert!(listed["sessions"].as_array().unwrap().is_empty());
    assert_eq!(listed["other_accounts"], 1, "{listed}");
    assert!(other.run(&["list"]).success().stdout.contains("1 session(s) of other AWS accounts"));
    let cost = other.run(&["cost", "--output", "json"]).success().json();
    assert!(cost["sessions"].as_array().unwrap().is_empty(), "another account's spending: {cost}");
    assert_eq!(cost["live"], 0.0, "{cost}");
    let mine = user.run(&["cost", "--output", "json"]).success().json();
    assert_eq!(mine["sessions"].as_array().unwrap().len(), 1, "{mine}");
    other.run(&["cleanup"]).success();

    assert!(key.exists(), "the first account's key is still there");
    let record =
        std::fs::read_to_string(user.state_dir().join(format!("sessions/{id}/session.toml"))).unwrap();
    assert!(!record.contains("ended_at"), "not settled as ended by the other account:\n{record}");
    let ledger = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap_or_default();
    assert!(!ledger.contains(id), "no ledger line for a session that runs: {ledger}");
    let run = user.run(&["connect", id, "--", "echo", "still-mine"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "still-mine");
    user.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}

/// Runs the CLI in a mount namespace whose `/proc` is an empty tmpfs: how a Mac looks to code
/// that reads `/proc`.
fn without_proc(user: &User, args: &[&str]) -> crate::support::cli::Run {
    let out = user
        .wrapper("unshare")
        .args(["-m", "sh", "-c", r#"mount -t tmpfs none /proc && exec "$@""#, "sh"])
        .arg(env!("CARGO_BIN_EXE_ephemeral-admin"))
        .args(args)
        .output()
        .unwrap();
    crate::support::cli::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn without_proc_a_live_attached_session_is_never_taken_for_an_orphan() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let attached = user
        .command(&crate::session::attached_args(&proxy, &["--", "sh", "-c", "sleep 4; echo finished"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::lifecycle::wait_until("the attached command to run", std::time::Duration::from_secs(60), || {
        crate::session::logged_in(&cloud)
    });
    let dry = without_proc(&user, &["cleanup", "--dry-run", "--output", "json"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let report: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    let sessions = report["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{report}");
    assert_eq!(sessions[0]["action"], "kept", "cannot tell is never dead: {report}");
    // The real thing, and a launch's own sweep, from the same /proc-less view.
    without_proc(&user, &["cleanup"]);
    let other = without_proc(&user, &["launch", "--detach", "--my-ip", "203.0.113.7", "--output", "json"]);
    assert_eq!(other.code, 0, "{}", other.stderr);
    let out = attached.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the attached session ran to its end: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "finished");
    let second: serde_json::Value = serde_json::from_str(&other.stdout).unwrap();
    user.run(&["terminate", second["session_id"].as_str().unwrap()]).success();
    assert_nothing_left(&cloud);
}
