//! The fourth layer: EventBridge Scheduler ends the box at its deadline and sweeps what a crash
//! left, with no client and no watchdog. The local cloud runs due schedules (moto only stores
//! them) as the schedule's role, with that role's policy evaluated, on a clock tests move.

use std::time::Duration;

use serde_json::{Value, json};

use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, launch_detached, proxy};
use crate::support::{LocalCloud, User};

fn schedules(cloud: &LocalCloud) -> Vec<Value> {
    cloud.state()["schedules"].as_array().unwrap().clone()
}

fn schedule<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no schedule {name}: {list:#?}"))
}

/// `at(…)` of an RFC 3339 UTC time as the CLI prints it (`2026-11-30T14:00:00Z`).
fn at(rfc3339: &str) -> String {
    format!("at({})", rfc3339.trim_end_matches('Z'))
}

fn plus_seconds(rfc3339: &str, seconds: i64) -> String {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap();
    (t + time::Duration::seconds(seconds)).format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn advance(cloud: &LocalCloud, seconds: f64) -> Value {
    cloud.control("POST", "scheduler/advance", Some(json!({ "seconds": seconds })))
}

fn invocations(cloud: &LocalCloud) -> Vec<Value> {
    cloud.control("GET", "scheduler", None)["invocations"].as_array().unwrap().clone()
}

fn instance_state(cloud: &LocalCloud, id: &str) -> String {
    let state = cloud.state();
    let found = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).cloned();
    found.map(|i| i["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

#[test]
fn launch_arms_the_deadline_outside_the_box_extend_moves_it_and_teardown_disarms_it() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let id = out["session_id"].as_str().unwrap();
    let instance = out["instance_id"].as_str().unwrap();
    let expires = out["expires_at"].as_str().unwrap();
    let list = schedules(&cloud);
    assert_eq!(list.len(), 3, "{list:#?}");
    let end = schedule(&list, &format!("ephemeral-admin-{id}-end"));
    // A minute after the deadline: the watchdog's own power-off (with its warnings) comes first.
    assert_eq!(end["expression"], at(&plus_seconds(expires, 60)));
    assert_eq!(end["timezone"], "UTC");
    assert_eq!(end["action_after_completion"], "DELETE");
    assert_eq!(end["target"]["Arn"], "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances");
    assert_eq!(end["input"], json!({ "InstanceIds": [instance] }));
    let sweep_group = schedule(&list, &format!("ephemeral-admin-{id}-sweep-group"));
    assert_eq!(sweep_group["expression"], at(&plus_seconds(expires, 15 * 60)));
    let group = crate::launch::own_groups(&cloud.state())[0]["id"].clone();
    assert_eq!(sweep_group["input"], json!({ "GroupId": group }));
    let sweep_alarm = schedule(&list, &format!("ephemeral-admin-{id}-sweep-alarm"));
    let alarm = cloud.state()["alarms"][0]["name"].clone();
    assert_eq!(sweep_alarm["input"], json!({ "AlarmNames": [alarm] }));
    // The role they run as trusts the scheduler only, for this account only, and may only end
    // the tool's boxes and sweep its groups and alarms.
    let role_arn = end["target"]["RoleArn"].as_str().unwrap();
    let state = cloud.state();
    let role = state["iam"]["roles"].as_array().unwrap().iter().find(|r| r["arn"] == role_arn).unwrap();
    let trust = &role["assume_role_policy_document"]["Statement"][0];
    assert_eq!(trust["Principal"]["Service"], "scheduler.amazonaws.com");
    assert_eq!(trust["Condition"]["StringEquals"]["aws:SourceAccount"], state["account_id"]);
    let policy = role["inline_policies"].as_object().unwrap().values().next().unwrap().to_string();
    assert!(
        policy.contains("ec2:TerminateInstances") && policy.contains("ec2:ResourceTag/Project"),
        "{policy}"
    );

    let listed = user.run(&["list", "--output", "json"]).success().json();
    assert_eq!(listed["sessions"][0]["deadline_schedule_armed"], true, "{listed}");
    let status = user.run(&["status", id, "--output", "json"]).success().json();
    let backstop = plus_seconds(expires, 60);
    assert_eq!(status["deadline_schedule_at"], backstop.as_str(), "{status}");
    let text = user.run(&["status", id]).success().stdout;
    assert!(text.contains(&format!("EventBridge Scheduler terminates the box at {backstop}")), "{text}");

    let extended = user.run(&["extend", id, "--by", "30m", "--output", "json"]).success().json();
    assert_eq!(extended["schedules_moved"], 3, "{extended}");
    let moved = extended["expires_at"].as_str().unwrap();
    let list = schedules(&cloud);
    assert_eq!(
        schedule(&list, &format!("ephemeral-admin-{id}-end"))["expression"],
        at(&plus_seconds(moved, 60))
    );
    let sweep = schedule(&list, &format!("ephemeral-admin-{id}-sweep-alarm"));
    assert_eq!(sweep["expression"], at(&plus_seconds(moved, 15 * 60)));
    assert_eq!(sweep["input"], json!({ "AlarmNames": [alarm] }), "the target is kept");

    let ended = user.run(&["terminate", id]).success();
    assert!(ended.stdout.contains("disarmed the scheduled deadline"), "{}", ended.stdout);
    assert_nothing_left(&cloud);
}

#[test]
fn a_box_whose_watchdog_never_ran_and_whose_laptop_vanished_is_ended_and_swept_by_the_schedules() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    // The watchdog's unit never starts on this box, and no CLI runs after the launch returns.
    cloud.control("PUT", "box-config", Some(json!({ "watchdog": false })));
    let out = launch_detached(&user, &proxy, &["--max-runtime", "1h"]);
    let instance = out["instance_id"].as_str().unwrap().to_string();
    let box_info = cloud.control("GET", &format!("box/{instance}"), None);
    assert!(box_info["watchdog_pid"].is_null(), "no watchdog on this box: {box_info}");
    assert_eq!(instance_state(&cloud, &instance), "running");

    // Just before the deadline (and its minute of grace for the watchdog) nothing happens...
    advance(&cloud, 3600.0 - 120.0);
    std::thread::sleep(Duration::from_millis(800));
    assert!(invocations(&cloud).is_empty());
    assert_eq!(instance_state(&cloud, &instance), "running");
    // ...then the schedule terminates the box, as its own role.
    advance(&cloud, 181.0);
    wait_until("the scheduled terminate", Duration::from_secs(20), || {
        instance_state(&cloud, &instance) == "terminated"
    });
    let fired = invocations(&cloud);
    assert_eq!(fired.len(), 1, "{fired:#?}");
    assert_eq!(fired[0]["target"], "arn:aws:scheduler:::aws-sdk:ec2:terminateInstances");
    assert_eq!(fired[0]["ok"], true, "{fired:#?}");
    // What a crash would leave (the group, the alarm) is still there until the sweeps run.
    let state = cloud.state();
    assert_eq!(crate::launch::own_groups(&state).len(), 1);
    assert_eq!(state["alarms"].as_array().unwrap().len(), 1);
    assert_eq!(schedules(&cloud).len(), 2, "the terminate schedule deleted itself");

    advance(&cloud, 15.0 * 60.0);
    wait_until("the sweeps", Duration::from_secs(20), || schedules(&cloud).is_empty());
    let fired = invocations(&cloud);
    assert!(fired.iter().all(|i| i["ok"] == true), "{fired:#?}");
    assert_nothing_left(&cloud);
}

#[test]
fn a_group_aws_still_holds_at_teardown_is_swept_minutes_later_with_no_cleanup() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &[]);
    let id = out["session_id"].as_str().unwrap();
    // As on AWS right after TerminateInstances: the shutting-down instance still holds the group.
    cloud.rules(json!([{ "action": "DeleteSecurityGroup", "error": "DependencyViolation", "times": 1 }]));
    let ended = user.run(&["terminate", id, "--output", "json"]).success().json();
    assert_eq!(ended["group"], "still-in-use", "{ended}");
    let list = schedules(&cloud);
    assert_eq!(list.len(), 1, "only a fresh group sweep is left: {list:#?}");
    let sweep = schedule(&list, &format!("ephemeral-admin-{id}-sweep-group"));
    let group = crate::launch::own_groups(&cloud.state())[0]["id"].clone();
    assert_eq!(sweep["input"], json!({ "GroupId": group }));
    // Five minutes on, the scheduler deletes the group: nobody runs cleanup or launches again.
    advance(&cloud, 5.0 * 60.0 + 5.0);
    wait_until("the group sweep", Duration::from_secs(20), || schedules(&cloud).is_empty());
    assert_eq!(invocations(&cloud)[0]["ok"], true, "{:#?}", invocations(&cloud));
    assert_nothing_left(&cloud);
}
