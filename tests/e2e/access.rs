//! SSH access belongs to one session: its own security group, its own rules, released at its own
//! teardown without asking anyone, so no other session's box is opened by it and no teardown or
//! cleanup of a neighbour ever closes it.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::launch::own_groups;
use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, attached_args, launch_detached, logged_in, proxy};
use crate::support::{LocalCloud, User};

fn group_of<'a>(state: &'a serde_json::Value, instance: &str) -> Vec<&'a serde_json::Value> {
    let box_ = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance).unwrap();
    let ids = box_["security_group_ids"].as_array().unwrap();
    state["security_groups"].as_array().unwrap().iter().filter(|g| ids.contains(&g["id"])).collect()
}

#[test]
fn one_sessions_rule_never_opens_another_sessions_box() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let run =
        user.run(&attached_args(&proxy, &["--detach", "--output", "json", "--allow-cidr", "0.0.0.0/0"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "--allow-cidr 0.0.0.0/0: SSH on this session's box is open to every address on the internet"
        ),
        "a wide rule is said out loud: {}",
        run.stderr
    );
    let wide = run.json();
    let narrow = launch_detached(&user, &proxy, &[]);
    let state = cloud.state();
    let rules = |instance: &str| -> Vec<String> {
        group_of(&state, instance)
            .iter()
            .flat_map(|g| g["ingress"].as_array().unwrap().iter())
            .map(|r| r["cidr_ipv4"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let wide_rules = rules(wide["instance_id"].as_str().unwrap());
    assert!(wide_rules.contains(&"0.0.0.0/0".to_string()), "{wide_rules:?}");
    assert_eq!(rules(narrow["instance_id"].as_str().unwrap()), ["203.0.113.7/32"], "only its own caller");
    for s in [&wide, &narrow] {
        user.run(&["terminate", s["session_id"].as_str().unwrap()]).success();
    }
    assert_nothing_left(&cloud);
}

#[test]
fn cleaning_up_a_neighbour_from_the_same_address_never_cuts_a_live_session() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let kept = launch_detached(&user, &proxy, &[]);
    let gone = launch_detached(&user, &proxy, &[]);
    let (kept_id, gone_id) = (kept["session_id"].as_str().unwrap(), gone["session_id"].as_str().unwrap());
    // Long after launch (past any "still launching" grace): the neighbour is removed by name.
    let later = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    let later = later.format(&time::format_description::well_known::Rfc3339).unwrap();
    let aged = user.env("EPHEMERAL_ADMIN_NOW", &later);
    aged.run(&["cleanup", gone_id]).success();
    let state = cloud.state();
    let kept_rules: Vec<_> = group_of(&state, kept["instance_id"].as_str().unwrap())
        .iter()
        .flat_map(|g| g["ingress"].as_array().unwrap().clone())
        .collect();
    assert_eq!(kept_rules.len(), 1, "the kept session's access stays: {kept_rules:#?}");
    let run = user.run(&["connect", kept_id, "--", "echo", "still-here"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "still-here");
    user.run(&["terminate", kept_id]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn a_teardown_racing_a_launch_from_the_same_address_leaves_the_new_session_its_access() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let old = launch_detached(&user, &proxy, &[]);
    let old_id = old["session_id"].as_str().unwrap().to_string();
    // The new session's rule is made while the old session's teardown releases its own.
    let launching = user
        .command(&attached_args(&proxy, &["--", "sh", "-c", "sleep 1; echo reached"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the new launch to open SSH", Duration::from_secs(30), || {
        cloud.count("AuthorizeSecurityGroupIngress") >= 2
    });
    user.run(&["terminate", &old_id]).success();
    wait_until("the new session's command", Duration::from_secs(60), || logged_in(&cloud));
    let out = launching.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reached");
    assert_nothing_left(&cloud);
}

#[test]
fn a_hand_made_group_of_the_same_name_is_left_alone_and_a_taken_name_is_one_line() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // The roadmap's manual step: an untagged `ephemeral-admin-sg` made by an admin.
    let vpc = cloud.admin_ec2(
        "print(ec2.describe_vpcs(Filters=[{'Name': 'is-default', 'Values': ['true']}])['Vpcs'][0]['VpcId'])",
    );
    let theirs = cloud.admin_ec2(&format!(
        "print(ec2.create_security_group(GroupName='ephemeral-admin-sg', Description='by hand', VpcId='{vpc}')['GroupId'])"
    ));
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let state = cloud.state();
    let groups = group_of(&state, session["instance_id"].as_str().unwrap());
    assert!(groups.iter().all(|g| g["id"] != theirs.as_str()), "their group is not used");
    user.run(&["terminate", session["session_id"].as_str().unwrap()]).success();
    let state = cloud.state();
    assert!(
        state["security_groups"].as_array().unwrap().iter().any(|g| g["id"] == theirs.as_str()),
        "nor removed"
    );

    // A session group's name taken by someone else: one line naming it and the setting, exit 2.
    cloud.rules(json!([{ "action": "CreateSecurityGroup", "error": "InvalidGroup.Duplicate", "times": 1 }]));
    let run = user.run(&attached_args(&proxy, &["--detach"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap();
    assert!(last.contains("security_group_name") && last.contains("ephemeral-admin-sg-"), "{last}");
    assert_eq!(cloud.count("RunInstances"), 1, "only the first launch ran an instance");
    assert!(own_groups(&cloud.state()).is_empty());
    assert_nothing_left(&cloud);
}

#[test]
fn a_group_aws_still_holds_at_teardown_is_deleted_by_the_next_launch() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let first = launch_detached(&user, &proxy, &[]);
    // As on AWS right after TerminateInstances: the shutting-down instance still holds the group.
    cloud.rules(json!([{ "action": "DeleteSecurityGroup", "error": "DependencyViolation", "times": 1 }]));
    let ended =
        user.run(&["terminate", first["session_id"].as_str().unwrap(), "--output", "json"]).success().json();
    assert_eq!(ended["group"], "still-in-use", "{ended}");
    assert_eq!(ended["rules"][0][1], "revoked", "access is cut at once all the same");
    let left = own_groups(&cloud.state());
    assert_eq!(left.len(), 1);
    assert!(left[0]["ingress"].as_array().unwrap().is_empty(), "an empty group: {left:#?}");
    // The next launch's own sweep removes it; nothing else has to remember.
    let second = launch_detached(&user, &proxy, &[]);
    let state = cloud.state();
    let groups = own_groups(&state);
    assert_eq!(groups.len(), 1, "only the new session's group: {groups:#?}");
    assert_eq!(groups[0]["tags"]["ephemeral-admin:session"], second["session_id"]);
    user.run(&["terminate", second["session_id"].as_str().unwrap()]).success();
    assert_nothing_left(&cloud);
}
