//! The box's own host key (issue #31): the first connection after a launch has the box make a
//! host key of its own and switch sshd to it, so the key the user-data carried (readable by root
//! on the box and by anyone allowed ec2:DescribeInstanceAttribute) no longer opens anything; a
//! launch killed in the middle of it leaves a record that the next `connect` finishes.

use std::process::Command;

use serde_json::Value;

use crate::lifecycle::login;
use crate::session::{launch_detached, proxy};
use crate::support::{LocalCloud, User};

/// "ssh-ed25519 AAAA…" (type and base64 only) of an OpenSSH public key line.
fn bare(key: &str) -> String {
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

fn record(user: &User, session: &str) -> toml::Value {
    let path = user.state_dir().join(format!("sessions/{session}/session.toml"));
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The Ed25519 public key the instance's user-data carries.
fn user_data_key(cloud: &LocalCloud, instance: &str) -> String {
    let state = cloud.state();
    let box_ = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance).unwrap();
    let user_data = box_["user_data"].as_str().unwrap();
    let line = user_data.lines().find_map(|l| l.trim().strip_prefix("ed25519_public: ")).unwrap();
    bare(line)
}

fn box_info(cloud: &LocalCloud, instance: &str) -> Value {
    cloud.control("GET", &format!("box/{instance}"), None)
}

/// The Ed25519 key the box's sshd offers right now (`ssh-keyscan` at its loopback port).
fn offered(cloud: &LocalCloud, instance: &str) -> String {
    let port = box_info(cloud, instance)["ssh_port"].as_u64().unwrap().to_string();
    let out =
        Command::new("ssh-keyscan").args(["-T", "10", "-t", "ed25519", "-p", &port, "127.0.0.1"]).output();
    let text = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    let line = text.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap_or_default();
    bare(&line.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
}

/// OpenSSH's client at the box's loopback port, logging in with the session key and pinning
/// `host_key` alone.
fn openssh_pinning(
    user: &User,
    cloud: &LocalCloud,
    session: &str,
    instance: &str,
    host_key: &str,
) -> Command {
    let port = box_info(cloud, instance)["ssh_port"].as_u64().unwrap().to_string();
    let dir = user.state_dir().join(format!("sessions/{session}"));
    let known_hosts = dir.join("pinning_known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}\n")).unwrap();
    let mut cmd = Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-i"])
        .arg(dir.join("id_ed25519"))
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-p", &port, &format!("{}@127.0.0.1", login()), "echo", "in"]);
    cmd
}

#[test]
fn after_launch_the_box_offers_its_own_host_key_and_the_user_data_key_is_refused() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let (session, instance) = (out["session_id"].as_str().unwrap(), out["instance_id"].as_str().unwrap());
    let from_user_data = user_data_key(&cloud, instance);
    let saved = record(&user, session);
    let pinned = bare(saved["host_key_public"].as_str().unwrap());
    assert_eq!(saved["host_key_state"].as_str(), Some("box"), "{saved:#?}");
    assert!(saved.get("host_key_next").is_none(), "{saved:#?}");
    assert_ne!(pinned, from_user_data, "the record pins the box's own key, not the user-data's");
    assert_eq!(
        out["host_key_fingerprint"].as_str(),
        saved["host_key_fingerprint"].as_str(),
        "the launch shows the new key"
    );
    assert_eq!(offered(&cloud, instance), pinned, "sshd offers the pinned key");

    // A client that pinned the user-data key (its private half is what leaked) is refused.
    let stale = openssh_pinning(&user, &cloud, session, instance, &from_user_data).output().unwrap();
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success() && stderr.contains("Host key verification failed"), "{stderr}");
    let fresh = openssh_pinning(&user, &cloud, session, instance, &pinned).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&fresh.stdout), "in\n", "{}", String::from_utf8_lossy(&fresh.stderr));
    // The box holds no other key: the user-data key's file was replaced, nothing is left over.
    let dir = std::path::PathBuf::from(box_info(&cloud, instance)["dir"].as_str().unwrap());
    let public_of = |file: &str| {
        let out = Command::new("ssh-keygen").arg("-y").arg("-f").arg(dir.join(file)).output().unwrap();
        bare(&String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!(public_of("ssh_host_ed25519_key"), pinned);
    assert!(!dir.join("ephemeral-admin-next-host-key").exists());

    // Every later connection pins it: connect, and ssh-config's known-hosts line.
    let run = user.run(&["connect", session, "--", "echo", "again"]).success();
    assert_eq!(run.stdout, "again\n");
    user.run(&["ssh-config", session]).success();
    let known = std::fs::read_to_string(user.state_dir().join(format!("sessions/{session}/known_hosts")));
    assert_eq!(bare(known.unwrap().split_once(' ').unwrap().1), pinned);
    user.run(&["terminate", session]).success();
}

/// `launch --detach` killed right after each step of the rotation: the record says `rotating`,
/// and the next `connect` accepts exactly the old or the new key, finishes the rotation and pins
/// the new key alone.
#[test]
fn a_launch_killed_during_the_host_key_rotation_is_finished_by_the_next_connect() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    for (step, switched) in [("host-key-made", false), ("host-key-switched", true)] {
        let args = crate::session::attached_args(&proxy, &["--detach", "--output", "json"]);
        let out = user.command(&args).env("EPHEMERAL_ADMIN_ABORT_AFTER", step).output().unwrap();
        assert_eq!(out.status.code(), None, "{step}: killed: {}", String::from_utf8_lossy(&out.stderr));
        let sessions = std::fs::read_dir(user.state_dir().join("sessions")).unwrap();
        let session = sessions
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .find(|id| record(&user, id)["host_key_state"].as_str() == Some("rotating"))
            .unwrap_or_else(|| panic!("{step}: a record that says rotating"));
        let saved = record(&user, &session);
        let instance = saved["instance_id"].as_str().unwrap().to_string();
        let (old, next) = (
            bare(saved["host_key_public"].as_str().unwrap()),
            bare(saved["host_key_next"].as_str().unwrap()),
        );
        assert_eq!(old, user_data_key(&cloud, &instance), "{step}");
        let now = offered(&cloud, &instance);
        assert_eq!(now, if switched { next.clone() } else { old.clone() }, "{step}: what sshd offers");

        let run = user.run(&["connect", &session, "--", "echo", "recovered"]);
        assert_eq!((run.code, run.stdout.as_str()), (0, "recovered\n"), "{step}: {}", run.stderr);
        let saved = record(&user, &session);
        assert_eq!(saved["host_key_state"].as_str(), Some("box"), "{step}: {saved:#?}");
        assert_eq!(bare(saved["host_key_public"].as_str().unwrap()), next, "{step}");
        assert_eq!(offered(&cloud, &instance), next, "{step}");
        user.run(&["terminate", &session]).success();
    }
}

/// A box that cannot make its own host key (here: no passwordless sudo) is not used on the
/// user-data's: the launch fails, says why, and removes everything; attached or detached.
#[test]
fn a_box_that_refuses_the_rotation_fails_the_launch_and_is_removed() {
    let cloud = LocalCloud::start();
    cloud.control("PUT", "box-config", Some(serde_json::json!({ "hostkey_rotation": false })));
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    for extra in [&["--detach"][..], &["--", "echo", "never"][..]] {
        let run = user.run(&crate::session::attached_args(&proxy, extra));
        assert_eq!(run.code, 1, "{extra:?}: {}", run.stderr);
        assert!(!run.stdout.contains("never"), "{extra:?}: {}", run.stdout);
        assert!(
            run.stderr.contains("the box could not make its own host key")
                && run.stderr.contains("sudo: a password is required"),
            "{extra:?}: {}",
            run.stderr
        );
        crate::session::assert_nothing_left(&cloud);
    }
}
