//! `cleanup` and crash safety: kill the CLI at every step of a launch, run `cleanup`, and nothing
//! of the session is left; other owners' and live sessions survive; concurrent and dry runs.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, attached_args, proxy};
use crate::support::{LocalCloud, User};

/// The steps `EPHEMERAL_ADMIN_ABORT_AFTER` can kill the CLI at, in launch order.
const CRASH_POINTS: &[&str] = &[
    "security-group",
    "prepare",
    "rule",
    "run-instances",
    "alarm",
    "schedule",
    "connecting",
    "host-key-made",
    "host-key-switched",
];

fn key_files(user: &User) -> Vec<std::path::PathBuf> {
    let Ok(dirs) = std::fs::read_dir(user.state_dir().join("sessions")) else { return Vec::new() };
    dirs.flatten().map(|d| d.path().join("id_ed25519")).filter(|p| p.exists()).collect()
}

/// Starts `launch -- sleep 60` and returns once the remote command runs.
fn live_session(cloud: &LocalCloud, user: &User, proxy: &str) -> Child {
    let before = accepted(cloud);
    let child = user
        .command(&attached_args(proxy, &["--", "sleep", "60"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the remote command", Duration::from_secs(30), || accepted(cloud) > before);
    child
}

/// How many SSH logins the box simulator's sshds have accepted so far.
fn accepted(cloud: &LocalCloud) -> usize {
    let boxes = cloud.control("GET", "box", None)["boxes"].as_array().cloned().unwrap_or_default();
    boxes
        .iter()
        .map(|b| {
            let info = cloud.control("GET", &format!("box/{}", b["instance_id"].as_str().unwrap()), None);
            info["sshd_log"]
                .as_array()
                .map(|l| l.iter().filter(|x| x.as_str().unwrap_or("").contains("Accepted publickey")).count())
                .unwrap_or(0)
        })
        .sum()
}

/// `launch -- true` that SIGKILLs itself right after `step`; returns its stderr.
fn crash_launch(user: &User, proxy: &str, step: &str) -> String {
    let out = user
        .command(&attached_args(proxy, &["--", "true"]))
        .env("EPHEMERAL_ADMIN_ABORT_AFTER", step)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), None, "{step}: the CLI was killed by SIGKILL: {stderr}");
    stderr
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_crash_at_every_step_of_launch_leaves_nothing_cleanup_cannot_remove() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let mut clean = Vec::new();
    for step in CRASH_POINTS {
        crash_launch(&user, &proxy, step);
        let run = user.run(&["cleanup"]);
        assert_eq!(run.code, 0, "{step}: {}\n{}", run.stdout, run.stderr);
        assert_nothing_left(&cloud);
        assert!(key_files(&user).is_empty(), "{step}: key left");
        clean.push(*step);
    }
    // Killed while the shell runs.
    let mut child = live_session(&cloud, &user, &proxy);
    kill9(&mut child);
    let run = user.run(&["cleanup", "--output", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let removed = &run.json()["sessions"][0];
    assert_eq!(removed["action"], "removed");
    assert!(removed["reason"].as_str().unwrap().starts_with("orphaned: its client"), "{removed}");
    assert_nothing_left(&cloud);
    assert!(key_files(&user).is_empty());
    clean.push("shell");
    println!("crash safety: {} of {} steps clean: {}", clean.len(), CRASH_POINTS.len() + 1, clean.join(", "));
    assert_eq!(clean.len(), CRASH_POINTS.len() + 1);
}

#[test]
fn default_cleanup_spares_other_owners_live_and_kept_sessions() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let json = |args: &[&str]| user.run(&[args, &["--output", "json"]].concat()).success().json();

    let mut live = live_session(&cloud, &user, &proxy);
    let kept = json(&attached_args(&proxy, &["--detach"]))["session_id"].as_str().unwrap().to_string();
    let other = json(&attached_args(&proxy, &["--detach", "--max-runtime", "1h"]));
    let other_id = other["session_id"].as_str().unwrap().to_string();
    // Make `other` another user's attached session: their owner tags, no local record here.
    let instance = other["instance_id"].as_str().unwrap();
    cloud.retag(instance, "ephemeral-admin:owner", "arn:aws:iam::123456789012:user/someone-else");
    cloud.retag(instance, "ephemeral-admin:owner-id", "AIDASOMEONEELSE0000009");
    cloud.retag(instance, "ephemeral-admin:mode", "attached");
    std::fs::remove_dir_all(user.state_dir().join(format!("sessions/{other_id}"))).unwrap();
    let mut dead = live_session(&cloud, &user, &proxy);
    kill9(&mut dead);

    let report = json(&["cleanup"]);
    let by_id =
        |id: &str| report["sessions"].as_array().unwrap().iter().find(|s| s["session_id"] == id).cloned();
    let sessions = report["sessions"].as_array().unwrap();
    let removed: Vec<&Value> = sessions.iter().filter(|s| s["action"] == "removed").collect();
    assert_eq!(removed.len(), 1, "only the orphan: {report:#}");
    assert_eq!(by_id(&kept).unwrap()["action"], "kept");
    assert!(by_id(&kept).unwrap()["reason"].as_str().unwrap().starts_with("kept on purpose"));
    assert!(
        sessions.iter().any(|s| s["reason"].as_str().unwrap().starts_with("in use by pid")),
        "{report:#}"
    );
    assert!(by_id(&other_id).is_none(), "another owner's session is not even listed");
    let live_instances =
        cloud.state()["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "running").count();
    assert_eq!(live_instances, 3, "live, kept and other still run");
    assert!(removed[0]["saved"].as_f64().unwrap() > 0.0, "time left x price");
    let text = user.run(&["cleanup", "--dry-run"]).success().stdout;
    assert!(text.starts_with("SESSION"), "{text}");

    // --all takes this owner's live and kept sessions too, never someone else's.
    let report = json(&["cleanup", "--all"]);
    assert_eq!(report["sessions"].as_array().unwrap().iter().filter(|s| s["action"] == "removed").count(), 2);
    let _ = live.wait();
    let running: Vec<String> = cloud.state()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(running, [instance.to_string()]);

    // --owner any is loud, and reaches it, for a team admin (AWS refuses anyone else).
    let mut team = crate::support::cloud::printed_policy();
    let extra = crate::support::cloud::printed(&["--team-admin"]);
    team["Statement"].as_array_mut().unwrap().extend(extra["Statement"].as_array().unwrap().iter().cloned());
    cloud.enforce(&team);
    let run = user.run(&["cleanup", "--owner", "any", &other_id]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("EVERY owner"), "{}", run.stderr);
    assert_nothing_left(&cloud);
}

#[test]
fn two_concurrent_cleanups_both_succeed_and_agree() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    for _ in 0..3 {
        crash_launch(&user, &proxy, "alarm");
    }
    let a = user.command(&["cleanup"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let b = user.command(&["cleanup"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_nothing_left(&cloud);
    assert!(key_files(&user).is_empty());
    // And again: nothing to do, still exit 0.
    let again = user.run(&["cleanup"]).success();
    assert!(again.stdout.starts_with("nothing to clean up"), "{}", again.stdout);
}

#[test]
fn dry_run_only_reads() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    crash_launch(&user, &proxy, "alarm");
    let before = cloud.state();
    cloud.clear_log();
    let report = user.run(&["cleanup", "--dry-run", "--output", "json"]).success().json();
    assert_eq!(report["sessions"][0]["action"], "would-remove");
    assert!(report["sessions"][0]["resources"].as_array().unwrap().len() >= 3, "{report:#}");
    let writes: Vec<String> = cloud
        .actions()
        .into_iter()
        .filter(|a| !(a.starts_with("Describe") || a.starts_with("List") || a.starts_with("Get")))
        .collect();
    assert!(writes.is_empty(), "a dry run only reads: {writes:?}");
    let after = cloud.state();
    assert_eq!(before["instances"], after["instances"]);
    assert_eq!(before["alarms"], after["alarms"]);
    assert!(!key_files(&user).is_empty(), "local files stay too");
}

#[test]
fn purge_removes_the_shared_resources_only_when_nothing_uses_them() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // Purging the standing IAM is an account admin's: the daily and the bootstrap policy.
    cloud.enforce(&crate::support::cloud::admin_policy());
    // A Session Manager box: the one kind that runs with the tool's instance profile.
    let kept = crate::session::ssm_box(&cloud, &user);
    let kept_id = kept["session_id"].as_str().unwrap();
    let run = user.run(&["cleanup", "--purge"]);
    assert_eq!(run.code, 1, "refuses while an instance uses them: {}", run.stdout);
    assert!(run.stdout.contains("still used by") && run.stdout.contains(kept_id), "{}", run.stdout);
    let state = cloud.state();
    assert_eq!(crate::launch::own_groups(&state).len(), 1, "the kept session's own group stays");
    // The box's role and the role its schedules run as both stay (and the boundary, always).
    assert_eq!(state["iam"]["roles"].as_array().unwrap().len(), 2, "{:#}", state["iam"]["roles"]);
    assert!(run.stdout.contains("still used by 3 schedule(s)"), "{}", run.stdout);

    let run = user.run(&["cleanup", "--all", "--purge"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let state = cloud.state();
    assert!(crate::launch::own_groups(&state).is_empty());
    assert!(state["iam"]["roles"].as_array().unwrap().is_empty());
    assert!(state["iam"]["instance_profiles"].as_array().unwrap().is_empty());
    assert_nothing_left(&cloud);
    // The bootstrap policy may not delete the boundary: it stays, and purge says so.
    assert!(run.stdout.contains("ephemeral-admin-boundary"), "{}", run.stdout);
    assert!(cloud.denials().is_empty(), "{:#?}", cloud.denials());
}

#[test]
fn purge_in_another_region_keeps_the_global_roles_a_box_elsewhere_still_uses() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.enforce(&crate::support::cloud::admin_policy());
    let kept = crate::session::ssm_box(&cloud, &user);
    let kept_id = kept["session_id"].as_str().unwrap();
    let instance = kept["instance_id"].as_str().unwrap();
    // IAM is global: a purge run from us-west-2 must see the box (and its schedules) in us-east-1.
    let run = user.run(&["cleanup", "--purge", "--region", "us-west-2"]);
    assert_eq!(run.code, 1, "refuses while a box elsewhere uses them: {}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!("still used by {instance} in us-east-1 (session {kept_id})")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("still used by 3 schedule(s)"), "{}", run.stdout);
    let state = cloud.state();
    assert_eq!(
        state["iam"]["roles"].as_array().unwrap().len(),
        2,
        "both roles stay: {:#}",
        state["iam"]["roles"]
    );
    assert_eq!(state["iam"]["instance_profiles"].as_array().unwrap().len(), 1);

    user.run(&["terminate", kept_id]).success();
    let run = user.run(&["cleanup", "--purge", "--region", "us-west-2"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let state = cloud.state();
    assert!(state["iam"]["roles"].as_array().unwrap().is_empty(), "{:#}", state["iam"]["roles"]);
    assert_nothing_left(&cloud);
}

#[test]
fn launch_sweeps_its_own_crashed_sessions_first() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    crash_launch(&user, &proxy, "alarm");
    let run = user.run(&attached_args(&proxy, &["--", "true"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("removed 1 leftover session(s)"), "{}", run.stderr);
    assert_nothing_left(&cloud);
}

#[test]
fn all_regions_scans_every_region_in_parallel() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    crash_launch(&user, &proxy, "alarm");
    let out = user
        .command(&[&["--region", "eu-west-1"][..], &attached_args(&proxy, &["--", "true"])].concat())
        .env("EPHEMERAL_ADMIN_ABORT_AFTER", "alarm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "{}", String::from_utf8_lossy(&out.stderr));
    // The default sweep is this region only.
    let report = user.run(&["cleanup", "--output", "json"]).success().json();
    assert_eq!(report["sessions"].as_array().unwrap().len(), 1);
    let report = user.run(&["cleanup", "--all-regions", "--output", "json"]).success().json();
    let regions: Vec<&str> =
        report["sessions"].as_array().unwrap().iter().map(|s| s["region"].as_str().unwrap()).collect();
    assert_eq!(regions, ["eu-west-1"], "{report:#}");
    assert!(report["regions"].as_array().unwrap().len() > 10, "every enabled region was scanned");
    let eu = cloud.control("GET", "state?region=eu-west-1", None);
    assert!(eu["instances"].as_array().unwrap().iter().all(|i| i["state"] == "terminated"));
    assert!(eu["alarms"].as_array().unwrap().is_empty());
    assert!(key_files(&user).is_empty());
}

/// Credentials of an STS AssumeRole session into role `role` (made here, by an administrator),
/// as `(access key, secret, session token)`.
fn assume_role(cloud: &LocalCloud, role: &str, session_name: &str) -> (String, String, String) {
    let script = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1",
          aws_access_key_id="other", aws_secret_access_key="other")
iam = boto3.client("iam", **kw)
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
try:
    iam.create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument=json.dumps(trust))
except iam.exceptions.EntityAlreadyExistsException:
    pass
c = boto3.client("sts", **kw).assume_role(
    RoleArn="arn:aws:iam::123456789012:role/" + sys.argv[2], RoleSessionName=sys.argv[3])["Credentials"]
print(json.dumps([c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]]))
"#;
    let out = std::process::Command::new(crate::support::cloud::python())
        .args(["-c", script, &cloud.url, role, session_name])
        .output()
        .expect("run boto3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let creds: (String, String, String) = serde_json::from_slice(&out.stdout).unwrap();
    creds
}

fn as_role_session(user: &User, creds: &(String, String, String)) -> User {
    user.env("AWS_ACCESS_KEY_ID", &creds.0)
        .env("AWS_SECRET_ACCESS_KEY", &creds.1)
        .env("AWS_SESSION_TOKEN", &creds.2)
}

fn listed(user: &User) -> Vec<String> {
    let out = user.run(&["list", "--output", "json"]).success().json();
    out["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_owner_is_the_role_not_the_login_session_and_an_owner_setting_overrides_it() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // Two logins into the same (non-SSO) role: the session name differs each time.
    let monday = assume_role(&cloud, "ea-admins", "alice-1764500000");
    let tuesday = assume_role(&cloud, "ea-admins", "alice-1764586400");
    let policy = crate::support::cloud::printed_policy();
    cloud.control(
        "PUT",
        "policy",
        Some(serde_json::json!({ "policy": policy, "access_keys": ["testing", monday.0, tuesday.0] })),
    );
    let (monday, tuesday) = (as_role_session(&user, &monday), as_role_session(&user, &tuesday));
    let out =
        monday.run(&["launch", "--detach", "--my-ip", "203.0.113.7", "--output", "json"]).success().json();
    let id = out["session_id"].as_str().unwrap().to_string();
    let state = cloud.state();
    let instance =
        state["instances"].as_array().unwrap().iter().find(|i| i["id"] == out["instance_id"]).unwrap();
    assert_eq!(instance["tags"]["ephemeral-admin:owner"], "arn:aws:iam::123456789012:role/ea-admins");
    assert_eq!(listed(&tuesday), [id.as_str()], "the next login sees its own session");
    // But to AWS the next login is another aws:userid (AROA…:SESSION): the owner-id tag is
    // Monday's, so Tuesday's login may not change it, and the CLI does not try.
    let cleanup = tuesday.run(&["cleanup", "--dry-run", "--output", "json"]).success().json();
    assert!(cleanup["sessions"].as_array().unwrap().iter().all(|s| s["session_id"] != id), "{cleanup:#}");
    let refused = tuesday.run(&["terminate", &id]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("role_session_name"), "{}", refused.stderr);
    let cleanup = monday.run(&["cleanup", "--dry-run", "--output", "json"]).success().json();
    let seen: Vec<&Value> =
        cleanup["sessions"].as_array().unwrap().iter().filter(|s| s["session_id"] == id).collect();
    assert_eq!(seen.len(), 1, "cleanup judges it as the caller's own: {cleanup:#}");
    assert!(listed(&user).is_empty(), "another identity (an IAM user) does not own it");

    // The `owner` setting names the owner whatever the login.
    let ops = user.env("EPHEMERAL_ADMIN_OWNER", "ops@example.com");
    let out = ops.run(&["launch", "--detach", "--my-ip", "203.0.113.7", "--output", "json"]).success().json();
    let other = out["session_id"].as_str().unwrap().to_string();
    let state = cloud.state();
    let instance =
        state["instances"].as_array().unwrap().iter().find(|i| i["id"] == out["instance_id"]).unwrap();
    assert_eq!(instance["tags"]["ephemeral-admin:owner"], "ops@example.com");
    let monday_as_ops = monday.env("EPHEMERAL_ADMIN_OWNER", "ops@example.com");
    assert_eq!(listed(&monday_as_ops), [other.as_str()]);
    assert_eq!(user.env("EPHEMERAL_ADMIN_OWNER", "bad,owner").run(&["list"]).code, 2);
    monday.run(&["terminate", &id]).success();
    ops.run(&["terminate", &other]).success();
}
