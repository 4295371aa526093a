//! Session names and `last` wherever an id is taken, and `ssh-config --install`: the user's own
//! OpenSSH (the system `ssh`) reaches a named box through the included file, and the block goes
//! when the session ends, whichever way it ends.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

fn instance_of(state: &Value, session: &str) -> Value {
    state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["tags"]["ephemeral-admin:session"] == session)
        .cloned()
        .unwrap_or_else(|| panic!("no instance of session {session}"))
}

#[test]
fn bad_names_are_refused_before_any_aws_call() {
    let user = User::offline();
    for bad in ["DB", "db_fix", "abcd2345", "webhost1", "last", "i-0123abcd", "ephemeral-admin-x", "fix-"] {
        let run = user.run(&["launch", "--name", bad, "--my-ip", "203.0.113.7"]);
        assert_eq!(run.code, 2, "{bad}: {}", run.stderr);
        assert!(run.stderr.contains("invalid --name"), "{bad}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {}", run.stderr);
    }
}

#[test]
fn names_instance_ids_and_last_work_wherever_an_id_does() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let named = launch_detached(&user, &proxy, &["--name", "db-fix"]);
    let named_id = named["session_id"].as_str().unwrap().to_string();
    assert_eq!(named["name"], "db-fix");
    let state = cloud.state();
    assert_eq!(instance_of(&state, &named_id)["tags"]["ephemeral-admin:name"], "db-fix");

    // Taken: exit 2, and nothing is made for the refused launch.
    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--detach", "--name", "db-fix"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("the name \"db-fix\" is taken by your live session"), "{}", run.stderr);
    let actions = cloud.actions();
    for create in ["CreateSecurityGroup", "RunInstances", "CreateRole", "AuthorizeSecurityGroupIngress"] {
        assert!(!actions.iter().any(|a| a == create), "{create} after a refused name: {actions:?}");
    }

    let other = launch_detached(&user, &proxy, &[]);
    let other_id = other["session_id"].as_str().unwrap().to_string();
    let status = |what: &str| user.run(&["status", what, "--output", "json"]).success().json();
    assert_eq!(status("db-fix")["session_id"], named_id.as_str());
    assert_eq!(status("db-fix")["name"], "db-fix");
    assert_eq!(status("last")["session_id"], other_id.as_str(), "last is the newest live session");
    let instance = named["instance_id"].as_str().unwrap();
    assert_eq!(status(instance)["session_id"], named_id.as_str());
    let listed = user.run(&["list"]).success().stdout;
    assert!(listed.contains("NAME") && listed.contains("db-fix"), "{listed}");
    assert!(user.run(&["status", "db-fix"]).success().stdout.contains("name        db-fix"));

    let run = user.run(&["connect", "db-fix", "--", "echo", "by-name"]).success();
    assert_eq!(run.stdout, "by-name\n");
    user.run(&["extend", "db-fix", "--by", "1h"]).success();
    let config = user.run(&["ssh-config", "last"]).success().stdout;
    assert!(config.starts_with(&format!("Host ephemeral-admin-{other_id}\n")), "{config}");

    // Unknown and ambiguous names: one line, exit 2.
    let run = user.run(&["status", "no-such-box"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("no live session named \"no-such-box\""), "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    cloud.retag(other["instance_id"].as_str().unwrap(), "ephemeral-admin:name", "db-fix");
    let run = user.run(&["terminate", "db-fix"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("ambiguous") && run.stderr.contains(&other_id), "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert_eq!(status(&named_id)["state"], "running", "an ambiguous name ends nothing");

    user.run(&["terminate", &named_id]).success();
    user.run(&["cleanup", "last"]).success();
    let run = user.run(&["status", "last"]);
    assert_eq!(run.code, 2, "no live session left: {}", run.stderr);
    assert_nothing_left(&cloud);
}

/// The system `ssh` with `-F ~/.ssh/config` and HOME set to the test user's, so `~` in the
/// `Include` line means the same home the CLI wrote to.
fn system_ssh(user: &User, host: &str, command: &str) -> std::process::Output {
    Command::new("ssh")
        .env("HOME", &user.home)
        .arg("-F")
        .arg(user.home.join(".ssh/config"))
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, command])
        .output()
        .unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn installed_ssh_hosts_reach_the_box_and_leave_with_the_session() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let ssh_dir = user.home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let mine = "Host work\n    User someone\n";
    std::fs::write(ssh_dir.join("config"), mine).unwrap();

    let named = launch_detached(&user, &proxy, &["--name", "db-fix"]);
    let named_id = named["session_id"].as_str().unwrap().to_string();
    let run = user.run(&["ssh-config", "db-fix", "--install"]).success();
    assert!(run.stdout.contains("installed host db-fix"), "{}", run.stdout);
    let own = ssh_dir.join("ephemeral-admin/config");
    assert_eq!(mode(&own), 0o600);
    let user_config = std::fs::read_to_string(ssh_dir.join("config")).unwrap();
    assert_eq!(user_config, format!("Include ~/.ssh/ephemeral-admin/config\n\n{mine}"));
    assert_eq!(std::fs::read_to_string(ssh_dir.join("config.ephemeral-admin.bak")).unwrap(), mine);

    let other = launch_detached(&user, &proxy, &[]);
    let other_id = other["session_id"].as_str().unwrap().to_string();
    user.run(&["ssh-config", &other_id, "--install"]).success();
    user.run(&["ssh-config", "db-fix", "--install"]).success();
    let user_config = std::fs::read_to_string(ssh_dir.join("config")).unwrap();
    assert_eq!(user_config.matches("Include").count(), 1, "included once: {user_config}");
    let text = std::fs::read_to_string(&own).unwrap();
    assert_eq!(text.matches("Host db-fix\n").count(), 1, "installing again replaces: {text}");

    let out = system_ssh(&user, "db-fix", "echo via-name");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via-name\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alias = format!("ephemeral-admin-{other_id}");
    let out = system_ssh(&user, &alias, "echo via-id");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-id\n", "{}", String::from_utf8_lossy(&out.stderr));

    // terminate: the block goes with the box; the other session's stays.
    let run = user.run(&["terminate", "db-fix"]).success();
    assert!(run.stdout.contains("removed its ssh host"), "{}", run.stdout);
    let text = std::fs::read_to_string(&own).unwrap();
    assert!(!text.contains("db-fix") && !text.contains(&named_id), "{text}");
    assert!(text.contains(&format!("Host {alias}\n")), "{text}");
    assert!(!system_ssh(&user, "db-fix", "true").status.success(), "db-fix no longer resolves to a box");

    // A box that ended on its own (here: terminated from the console): the next command settles
    // it and takes its block out.
    let instance = other["instance_id"].as_str().unwrap();
    cloud.admin_ec2(&format!("ec2.terminate_instances(InstanceIds=['{instance}'])"));
    user.run(&["list"]).success();
    let text = std::fs::read_to_string(&own).unwrap();
    assert!(!text.contains(&other_id), "{text}");
    assert_eq!(
        std::fs::read_to_string(ssh_dir.join("config")).unwrap(),
        format!("Include ~/.ssh/ephemeral-admin/config\n\n{mine}")
    );
    user.run(&["cleanup"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn cleanup_removes_the_installed_host_of_the_sessions_it_removes() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    // No ~/.ssh at all: it is created private.
    let out = launch_detached(&user, &proxy, &["--name", "scratch"]);
    user.run(&["ssh-config", "scratch", "--install"]).success();
    let ssh_dir = user.home.join(".ssh");
    assert_eq!(mode(&ssh_dir), 0o700);
    assert_eq!(
        std::fs::read_to_string(ssh_dir.join("config")).unwrap(),
        "Include ~/.ssh/ephemeral-admin/config\n"
    );
    assert!(!ssh_dir.join("config.ephemeral-admin.bak").exists(), "nothing to back up");
    user.run(&["cleanup", "scratch"]).success();
    let text = std::fs::read_to_string(ssh_dir.join("ephemeral-admin/config")).unwrap();
    assert!(!text.contains(out["session_id"].as_str().unwrap()), "{text}");
    assert_nothing_left(&cloud);
}

#[test]
fn proxy_carries_a_public_ip_session_for_openssh_and_sends_a_proxied_one_to_its_own_command() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let login = crate::lifecycle::login();
    let args = ["launch", "--detach", "--my-ip", "203.0.113.7", "--user", login, "--output", "json"];
    let out = user.run(&args).success().json();
    let id = out["session_id"].as_str().unwrap().to_string();
    let block = user.run(&["ssh-config", &id]).success().stdout;
    assert!(!block.contains("ProxyCommand"), "straight TCP needs none: {block}");
    let config = user.home.join("proxied_config");
    let bin = env!("CARGO_BIN_EXE_ephemeral-admin");
    std::fs::write(&config, format!("{block}    ProxyCommand {bin} -q proxy {id}\n")).unwrap();
    let done = user
        .wrapper("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-o", "BatchMode=yes", &format!("ephemeral-admin-{id}"), "echo through-$((6*7)); exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(done.status.code(), Some(3), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(String::from_utf8_lossy(&done.stdout), "through-42\n");
    user.run(&["terminate", &id]).success();

    // A session reached through a proxy command already: that command is the one to use.
    let proxied = launch_detached(&user, &proxy(&cloud), &[]);
    let proxied_id = proxied["session_id"].as_str().unwrap().to_string();
    let run = user.run(&["proxy", &proxied_id]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "nothing but the stream on stdout: {}", run.stdout);
    assert!(run.stderr.contains("through a proxy command already"), "{}", run.stderr);
    user.run(&["terminate", &proxied_id]).success();
    assert_nothing_left(&cloud);
}
