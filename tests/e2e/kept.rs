//! Boxes the user meant to keep stay: a session left running by `connect` is not the next
//! launch's orphan, and a kept box lives by its own (longer) idle policy.

use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

fn user_data_of(cloud: &LocalCloud, instance: &str) -> String {
    let state = cloud.state();
    let box_ = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance).unwrap();
    box_["user_data"].as_str().unwrap().to_string()
}

#[test]
fn kept_sessions_have_their_own_idle_policy_shown_by_status_and_list() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let kept = launch_detached(&user, &proxy, &[]);
    assert!(user_data_of(&cloud, kept["instance_id"].as_str().unwrap()).contains("EA_IDLE_GRACE=1800\n"));
    assert_eq!(kept["idle_grace_seconds"], 1800);
    let id = kept["session_id"].as_str().unwrap();
    let status = user.run(&["status", id]).success().stdout;
    assert!(status.contains("kept: off after 30m without SSH"), "{status}");
    let list = user.run(&["list"]).success().stdout;
    assert!(list.contains("IDLE") && list.contains("kept: off after 30m"), "{list}");
    user.run(&["terminate", id]).success();

    // An attached session keeps the short grace; the setting moves the kept one.
    let custom = user.env("EPHEMERAL_ADMIN_KEPT_IDLE_GRACE", "45m");
    let kept = launch_detached(&custom, &proxy, &[]);
    assert!(user_data_of(&cloud, kept["instance_id"].as_str().unwrap()).contains("EA_IDLE_GRACE=2700\n"));
    custom.run(&["terminate", kept["session_id"].as_str().unwrap()]).success();
    let run = user.run(&attached_args(&proxy, &["--", "true"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let state = cloud.state();
    let last = state["instances"].as_array().unwrap().last().unwrap();
    assert!(last["user_data"].as_str().unwrap().contains("EA_IDLE_GRACE=120\n"));
    assert_nothing_left(&cloud);
}

#[test]
fn a_session_left_running_by_connect_is_not_swept_by_the_next_launch() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    // An attached launch whose launcher dies without tearing down (a power cut after connecting).
    let crashed = user.env("EPHEMERAL_ADMIN_ABORT_AFTER", "connecting");
    let run = crashed.run(&attached_args(&proxy, &["--", "true"]));
    assert_ne!(run.code, 0);
    let listed = user.run(&["list", "--output", "json"]).success().json();
    let id = listed["sessions"][0]["session_id"].as_str().unwrap().to_string();
    // The user comes back to it with connect, and leaves it running.
    let back = user.run(&["connect", &id, "--", "echo", "back"]);
    assert_eq!(back.code, 0, "{}", back.stderr);
    let dry = user.run(&["cleanup", "--dry-run", "--output", "json"]).success().json();
    assert_eq!(dry["sessions"][0]["action"], "kept", "{dry}");
    // The next launch's sweep leaves it alone.
    let next = launch_detached(&user, &proxy, &[]);
    let state = cloud.state();
    let live: Vec<_> =
        state["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "running").collect();
    assert_eq!(live.len(), 2, "both boxes run: {live:#?}");
    for s in [id.as_str(), next["session_id"].as_str().unwrap()] {
        user.run(&["terminate", s]).success();
    }
    assert_nothing_left(&cloud);
}

#[test]
fn concurrent_commands_never_lose_each_others_record_changes() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();
    // `connect` takes the session over (its launcher is gone) while `extend` moves the deadline:
    // both rewrite the one record.
    for _ in 0..10 {
        let extend = user.command(&["extend", id, "--by", "1m", "-q"]).spawn().unwrap();
        let connect = user.command(&["connect", id, "-q", "--", "true"]).spawn().unwrap();
        for mut child in [extend, connect] {
            assert!(child.wait().unwrap().success());
        }
    }
    let tag = cloud.state()["instances"][0]["tags"]["ephemeral-admin:expires-at"].clone();
    let record =
        std::fs::read_to_string(user.state_dir().join(format!("sessions/{id}/session.toml"))).unwrap();
    assert!(record.contains(&format!("expires_at = {tag}")), "the record follows the tag {tag}:\n{record}");
    user.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}
