//! Cost control and observability: the ledger (including sessions the watchdog ended while no
//! CLI ran), the budget guard, metrics, session logs, the dashboard, AWS Budgets, and `cost`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

fn ledger(user: &User) -> Vec<Value> {
    let text = std::fs::read_to_string(user.state_dir().join("ledger.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn every_session_gets_one_correct_ledger_line_and_its_metrics_and_log() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let run = user.run(&attached_args(&proxy, &["--timings", "--", "sh", "-c", "sleep 1; echo done"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("timings: settings=") && run.stderr.contains("first_output="),
        "{}",
        run.stderr
    );
    let lines = ledger(&user);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let e = &lines[0];
    assert_eq!(
        (e["region"].as_str(), e["availability_zone"].as_str()),
        (Some("us-east-1"), Some("us-east-1c"))
    );
    assert_eq!((e["instance_type"].as_str(), e["market"].as_str()), (Some("t3.small"), Some("spot")));
    assert_eq!(e["ended_by"], "exit");
    assert_eq!(e["launch_attempts"], 1);
    let duration = e["duration_seconds"].as_i64().unwrap();
    assert!((1..30).contains(&duration), "{e}");
    let price = e["price_per_hour"].as_f64().unwrap();
    let hours = duration as f64 / 3600.0;
    assert!(close(e["cost"]["compute"].as_f64().unwrap(), price * hours));
    assert!(close(e["cost"]["ipv4"].as_f64().unwrap(), 0.005 * hours));
    assert!(close(e["cost"]["ebs"].as_f64().unwrap(), 8.0 * 0.08 / 730.0 * hours));
    let sum: f64 = ["compute", "ipv4", "ebs"].iter().map(|k| e["cost"][k].as_f64().unwrap()).sum();
    assert!(close(e["cost"]["total"].as_f64().unwrap(), sum));
    for phase in ["settings", "prepare", "run-instances", "running", "ssh", "first_output"] {
        assert!(e["timings_ms"][phase].is_u64(), "timing {phase} recorded: {e}");
    }
    assert!(run.stderr.contains("cost about $"), "the summary line reports the cost: {}", run.stderr);

    // The metrics, with their dimensions and the ledger's values.
    let state = cloud.state();
    let metric = |name: &str| -> Value {
        state["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    for name in ["SessionDuration", "SessionCost", "TimeToShell", "LaunchAttempts"] {
        let m = metric(name);
        assert_eq!(m["namespace"], "EphemeralAdmin", "{name}: {m}");
        assert_eq!(
            m["dimensions"],
            json!({"Region": "us-east-1", "InstanceType": "t3.small", "Market": "spot"})
        );
    }
    assert_eq!(metric("SessionDuration")["value"].as_f64().unwrap(), duration as f64);
    assert!(close(metric("SessionCost")["value"].as_f64().unwrap(), e["cost"]["total"].as_f64().unwrap()));
    assert_eq!(
        metric("TimeToShell")["value"].as_f64().unwrap(),
        e["timings_ms"]["first_output"].as_f64().unwrap()
    );
    assert_eq!(metric("LaunchAttempts")["value"], 1.0);

    // The session log: start, connect, end, a week's retention.
    let instance = state["instances"][0]["id"].as_str().unwrap();
    let group = state["log_groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == format!("/aws/ephemeral-container/{instance}"))
        .unwrap();
    assert_eq!(group["retention_in_days"], 7);
    let events: Vec<&str> = group["streams"][0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{events:#?}");
    assert!(
        events[0].starts_with("start session=")
            && events[1].starts_with("connect session=")
            && events[2].starts_with("end session=")
    );
    assert!(events[2].contains("reason=exit"));

    // terminate and cleanup end sessions too, each once.
    let detached = launch_detached(&user, &proxy, &[]);
    let id = detached["session_id"].as_str().unwrap();
    user.run(&["terminate", id]).success();
    user.run(&["terminate", id]);
    let out = user
        .command(&attached_args(&proxy, &["--", "true"]))
        .env("EPHEMERAL_ADMIN_ABORT_AFTER", "alarm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None);
    user.run(&["cleanup"]).success();
    let ended: Vec<String> =
        ledger(&user).iter().map(|e| e["ended_by"].as_str().unwrap().to_string()).collect();
    assert_eq!(ended, ["exit", "terminate", "cleanup"]);
    assert_nothing_left(&cloud);
    crate::foundation::assert_policy_covers(&cloud, &user);
}

#[test]
fn sessions_the_watchdog_ended_while_away_are_settled_on_the_next_command() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // Each detached launch connects once (the box gets its own host key), which the watchdog may
    // or may not see: the idle box ends either way (never connected after the boot grace, or
    // idle after the kept idle grace), the other at its deadline, before either grace.
    user.write_config(
        "watchdog_interval = \"1s\"\nboot_grace = \"10s\"\nidle_grace = \"60s\"\nkept_idle_grace = \"15s\"\n",
    );
    let proxy = proxy(&cloud);
    let idle = launch_detached(&user, &proxy, &[]);
    let deadline = launch_detached(&user, &proxy, &["--max-runtime", "8s"]);
    let instances = [idle["instance_id"].as_str().unwrap(), deadline["instance_id"].as_str().unwrap()];
    wait_until("the watchdogs to end both boxes", Duration::from_secs(40), || {
        let state = cloud.state();
        instances.iter().all(|id| {
            state["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == *id && i["state"] == "terminated")
        })
    });
    assert!(ledger(&user).is_empty(), "no CLI ran meanwhile");
    user.run(&["list"]).success();
    let lines = ledger(&user);
    let by = |id: &Value| lines.iter().find(|e| e["session_id"] == *id).unwrap()["ended_by"].clone();
    assert_eq!(by(&idle["session_id"]), "idle");
    assert_eq!(by(&deadline["session_id"]), "deadline");
    assert_eq!(lines.len(), 2);
    // Settling also publishes what a teardown would have: the end event and the metrics.
    let state = cloud.state();
    let log = |instance: &str| -> Vec<String> {
        let group = state["log_groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == format!("/aws/ephemeral-container/{instance}"));
        group
            .map(|g| {
                g["streams"][0]["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["message"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        log(instances[0]).last().is_some_and(|e| e.starts_with("end ") && e.contains("reason=idle")),
        "{:?}",
        log(instances[0])
    );
    assert!(
        log(instances[1]).last().is_some_and(|e| e.contains("reason=deadline")),
        "{:?}",
        log(instances[1])
    );
    let durations =
        state["metrics"].as_array().unwrap().iter().filter(|m| m["name"] == "SessionDuration").count();
    assert_eq!(durations, 2);
    user.run(&["list"]).success();
    assert_eq!(ledger(&user).len(), 2, "settled once");
    let keys = std::fs::read_dir(user.state_dir().join("sessions"))
        .unwrap()
        .flatten()
        .filter(|d| d.path().join("id_ed25519").exists())
        .count();
    assert_eq!(keys, 0, "their keys are gone");
}

#[test]
fn the_budget_guard_refuses_with_exact_figures_and_the_override_launches() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    user.write_config("monthly_budget = 0.05\n");
    // Already spent this month: $0.03.
    let now = time::OffsetDateTime::now_utc();
    let start = now - time::Duration::hours(2);
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    let spent = json!({"session_id": "past1234", "region": "us-east-1", "availability_zone": null, "instance_type": "t3.small",
        "market": "spot", "price_per_hour": 0.015, "start": fmt(start), "end": fmt(now - time::Duration::hours(1)),
        "duration_seconds": 3600, "cost": {"compute": 0.03, "ipv4": 0.0, "ebs": 0.0, "total": 0.03}, "ended_by": "exit"});
    // (A session that began last month counts only for its part in this month; keep it simple here.)
    let same_month = start.month() == now.month();
    std::fs::create_dir_all(user.state_dir()).unwrap();
    std::fs::write(user.state_dir().join("ledger.jsonl"), format!("{spent}\n")).unwrap();
    let proxy = proxy(&cloud);
    let run = user.run(&attached_args(&proxy, &["--detach"]));
    if same_month {
        assert_eq!(run.code, 4, "{}", run.stderr);
        let line = run.stderr.lines().last().unwrap();
        assert_eq!(
            line,
            "error: this session could cost up to $0.0467 (4h of t3.small spot in us-east-1c at $0.0058/h, with IPv4 and EBS), \
             but $0.0300 of the $0.0500 monthly budget is spent this month and $0.0200 is left: pass --over-budget to launch \
             anyway, or raise monthly_budget in the config"
        );
        assert_eq!(cloud.count("RunInstances"), 0, "refused before launching");
        assert_nothing_left(&cloud);
    }
    let run = user.run(&attached_args(&proxy, &["--detach", "--over-budget"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("over budget (--over-budget given)") || !same_month, "{}", run.stderr);
    // extend warns when it crosses the budget.
    let listed = user.run(&["list", "--output", "json"]).success().json();
    let id = listed["sessions"][0]["session_id"].as_str().unwrap();
    let run = user.run(&["extend", id, "--by", "2h"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("against a monthly budget of $0.0500"), "{}", run.stderr);
    user.run(&["terminate", id]).success();
}

#[test]
fn dashboard_and_budget_are_created_and_updated() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    user.run(&["dashboard"]).success();
    let state = cloud.state();
    let body: Value = serde_json::from_str(state["dashboards"][0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(state["dashboards"][0]["name"], "ephemeral-admin");
    let text = body.to_string();
    for metric in ["SessionCost", "SessionDuration", "TimeToShell", "LaunchAttempts"] {
        assert!(text.contains(metric) && text.contains("EphemeralAdmin"), "{metric} in {text}");
    }
    user.run(&["dashboard"]).success();
    assert_eq!(cloud.state()["dashboards"].as_array().unwrap().len(), 1, "updated, not duplicated");

    let out = user.run(&["budget", "--email", "ops@example.com", "--output", "json"]).success().json();
    assert_eq!(out["created"], true);
    let budget = |state: &Value| state["budgets"][0].clone();
    let b = budget(&cloud.state());
    assert_eq!(b["BudgetName"], "ephemeral-admin-monthly");
    assert_eq!(
        (b["BudgetLimit"]["Amount"].as_str(), b["TimeUnit"].as_str()),
        (Some("2.00"), Some("MONTHLY"))
    );
    assert_eq!(
        b["FilterExpression"]["Tags"],
        json!({"Key": "user:Project", "Values": ["EphemeralContainer"], "MatchOptions": ["EQUALS"]})
    );
    let calls = cloud.calls();
    let create = calls.iter().find(|c| c["action"] == "CreateBudget").unwrap();
    let notes = create["json"]["NotificationsWithSubscribers"].as_array().unwrap();
    let thresholds: Vec<f64> =
        notes.iter().map(|n| n["Notification"]["Threshold"].as_f64().unwrap()).collect();
    assert_eq!(thresholds, [80.0, 100.0]);
    assert!(notes.iter().all(|n| n["Subscribers"] == json!([{"SubscriptionType": "EMAIL", "Address": "ops@example.com"}])));
    let out = user
        .run(&["budget", "--email", "ops@example.com", "--limit", "5", "--output", "json"])
        .success()
        .json();
    assert_eq!((out["created"].as_bool(), out["alerts_added"].as_array().unwrap().len()), (Some(false), 0));
    assert_eq!(budget(&cloud.state())["BudgetLimit"]["Amount"], "5.00");
    assert_eq!(user.run(&["budget", "--email", "not-an-address"]).code, 2);
    crate::foundation::assert_policy_covers(&cloud, &user);
}

#[test]
fn cost_splits_sessions_across_month_boundaries_in_utc() {
    let user = User::offline();
    std::fs::create_dir_all(user.state_dir()).unwrap();
    let entry = |id: &str, start: &str, end: &str, total: f64| {
        json!({"session_id": id, "region": "us-east-1", "availability_zone": "us-east-1c", "instance_type": "t3.small",
            "market": "spot", "price_per_hour": 0.01, "start": start, "end": end, "duration_seconds": 3600,
            "cost": {"compute": total, "ipv4": 0.0, "ebs": 0.0, "total": total}, "ended_by": "exit"})
        .to_string()
    };
    let fixture = [
        entry("sept0001", "2026-09-10T10:00:00Z", "2026-09-10T11:00:00Z", 1.0),
        // 23:30Z Oct 31 to 00:30Z Nov 1: half in November.
        entry("span0002", "2026-10-31T23:30:00Z", "2026-11-01T00:30:00Z", 0.10),
        // Local time +02:00; entirely in November.
        entry("local003", "2026-11-15T10:00:00+02:00", "2026-11-15T12:00:00+02:00", 0.04),
        // Nov 30 23:00 at -05:00 is Dec 1 04:00 UTC: December's.
        entry("west0004", "2026-11-30T23:00:00-05:00", "2026-12-01T00:00:00-05:00", 0.02),
    ];
    std::fs::write(user.state_dir().join("ledger.jsonl"), fixture.join("\n") + "\n").unwrap();
    let nov = user.env("EPHEMERAL_ADMIN_NOW", "2026-11-20T12:00:00Z");
    let dec = user.env("EPHEMERAL_ADMIN_NOW", "2026-12-10T00:00:00Z");
    let report = nov.run(&["cost", "--output", "json"]).success().json();
    assert_eq!(report["month"], "2026-11");
    assert!(close(report["spent"].as_f64().unwrap(), 0.05 + 0.04), "{report:#}");
    assert!(close(report["remaining"].as_f64().unwrap(), 2.0 - 0.09));
    let ids: Vec<&str> =
        report["sessions"].as_array().unwrap().iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["span0002", "local003"]);
    assert!(close(report["sessions"][0]["cost"].as_f64().unwrap(), 0.05));
    let text = nov.run(&["cost"]).success().stdout;
    assert!(text.ends_with("2026-11: $0.0900 spent of $2.00 ($1.91 left)\n"), "{text}");

    let report = dec.run(&["cost", "--output", "json"]).success().json();
    assert!(close(report["spent"].as_f64().unwrap(), 0.02), "{report:#}");
    let report = dec.run(&["cost", "--month", "2026-09", "--output", "json"]).success().json();
    assert!(close(report["spent"].as_f64().unwrap(), 1.0));
    assert_eq!(dec.run(&["cost", "--month", "2026-9"]).code, 2);
}

/// Writes a local record of a session that nobody settled: launched `hours_ago` at $1/h, with a
/// one-hour deadline long past (issue #12, item 9).
fn stale_record(user: &User, id: &str, region: &str, hours_ago: i64, pid: Option<u32>) {
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    let launched = time::OffsetDateTime::now_utc() - time::Duration::hours(hours_ago);
    let dir = user.state_dir().join("sessions").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let pid = pid.map(|p| format!("pid = {p}\npid_start = {}\n", start_ticks(p))).unwrap_or_default();
    let record = format!(
        "id = \"{id}\"\nregion = \"{region}\"\nowner_arn = \"arn:aws:sts::123456789012:user/moto\"\n\
         created_at = \"{launched}\"\nlaunched_at = \"{launched}\"\nexpires_at = \"{deadline}\"\nkept = true\n\
         user = \"ubuntu\"\nhost_key_public = \"\"\nhost_key_fingerprint = \"\"\nclient_key_public = \"\"\n\
         instance_id = \"i-0123456789abcdef0\"\ninstance_type = \"m5.large\"\nmarket = \"on-demand\"\n\
         price_per_hour = 1.0\n{pid}",
        launched = fmt(launched),
        deadline = fmt(launched + time::Duration::hours(1)),
    );
    std::fs::write(dir.join("session.toml"), record).unwrap();
}

/// A process's start time as the CLI records it (Linux: clock ticks since boot), so the CLI can
/// tell the process is certainly alive.
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn stale_records_count_only_up_to_their_deadline_and_are_settled_in_every_region() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    user.write_config("monthly_budget = 5\n");
    // Counted up to now, each of these two would be over $25: the launch used to be refused.
    // Both are in other regions: one was never settled there, one has a live launcher (this
    // test), so it is not settled at all and counts as running, up to its deadline.
    stale_record(&user, "stavewes", "eu-west-1", 26, None);
    stale_record(&user, "stazzyve", "us-west-2", 26, Some(std::process::id()));
    let run = user.run(&["launch", "--detach", "--my-ip", "203.0.113.7", "--output", "json"]);
    assert_eq!(run.code, 0, "not refused: {}", run.stderr);
    let launched = run.json();
    // The other region was asked about its record, once, and it was settled at its deadline.
    let asked: Vec<Value> = cloud
        .calls()
        .into_iter()
        .filter(|c| c["action"] == "DescribeInstances" && c["region"] == "eu-west-1")
        .collect();
    assert_eq!(asked.len(), 1, "{asked:#?}");
    assert!(!cloud.calls().iter().any(|c| c["region"] == "us-west-2"), "nothing to settle there");
    let lines = ledger(&user);
    let stale = lines.iter().find(|e| e["session_id"] == "stavewes").expect("settled");
    assert_eq!(stale["region"], "eu-west-1");
    assert_eq!(stale["duration_seconds"], 3600, "ran until its deadline at most: {stale}");
    // Nothing in any ledger line runs past its deadline.
    assert!(lines.iter().all(|e| e["duration_seconds"].as_i64().unwrap() <= 3600), "{lines:#?}");
    user.run(&["terminate", launched["session_id"].as_str().unwrap()]).success();
}
