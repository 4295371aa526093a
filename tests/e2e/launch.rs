//! `launch --detach`, `list`, `status`, `terminate` against moto through the fault proxy: what
//! is created (every attribute), what is reused, how the fallback chain moves on, and that a
//! failed launch leaves nothing behind.

use serde_json::{Value, json};

use crate::support::{LocalCloud, User};

const MY_IP: &str = "203.0.113.7";

fn launch(user: &User, extra: &[&str]) -> Value {
    let mut args = vec!["launch", "--detach", "--output", "json", "--my-ip", MY_IP];
    args.extend_from_slice(extra);
    user.run(&args).success().json()
}

fn instance<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap_or_else(|| panic!("no {id}"))
}

/// The security groups the tool made (tagged as its own).
pub fn own_groups(state: &Value) -> Vec<Value> {
    state["security_groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["tags"]["Project"] == "EphemeralContainer")
        .cloned()
        .collect()
}

/// A session's own security group.
fn session_group(state: &Value, session: &str) -> Value {
    own_groups(state)
        .into_iter()
        .find(|g| g["tags"]["ephemeral-admin:session"] == session)
        .unwrap_or_else(|| panic!("no security group for session {session}"))
}

/// Live instances, open rules and alarms a session left in moto.
pub fn leftovers(cloud: &LocalCloud, session: &str) -> Vec<String> {
    let state = cloud.state();
    let mut left = Vec::new();
    for i in state["instances"].as_array().unwrap() {
        if i["tags"]["ephemeral-admin:session"] == session && i["state"] != "terminated" {
            left.push(format!("instance {} ({})", i["id"], i["state"]));
        }
    }
    for g in own_groups(&state) {
        if g["tags"]["ephemeral-admin:session"] == session {
            left.push(format!(
                "security group {} ({} rules)",
                g["id"],
                g["ingress"].as_array().unwrap().len()
            ));
        }
    }
    for a in state["alarms"].as_array().unwrap() {
        if a["name"].as_str().unwrap().contains(session) {
            left.push(format!("alarm {}", a["name"]));
        }
    }
    for s in state["spot_requests"].as_array().unwrap() {
        if s["tags"]["ephemeral-admin:session"] == session
            && matches!(s["state"].as_str(), Some("open" | "active"))
        {
            left.push(format!("spot request {}", s["id"]));
        }
    }
    left
}

#[test]
fn detached_launch_creates_exactly_a_locked_down_tagged_spot_box() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    user.write_config("[tags]\nCostCenter = \"ops\"\n");
    let out = launch(&user, &[]);
    let session = out["session_id"].as_str().unwrap();
    let instance_id = out["instance_id"].as_str().unwrap();
    // Printed: the cheapest zone (the local cloud seeds us-east-1c cheapest), market, price, address.
    assert_eq!(out["instance_type"], "t3.small");
    assert_eq!(out["availability_zone"], "us-east-1c");
    assert_eq!(out["market"], "spot");
    assert_eq!(out["state"], "running");
    assert!(
        out["public_ip"].is_string() && out["host_key_fingerprint"].as_str().unwrap().starts_with("SHA256:")
    );
    assert!(out["price_per_hour"].as_f64().unwrap() > 0.0);
    assert!(out["time_left_seconds"].as_i64().unwrap() > 4 * 3600 - 60);

    let state = cloud.state();
    let box_ = instance(&state, instance_id);
    assert_eq!(box_["state"], "running");
    assert_eq!(box_["market"], "spot");
    assert_eq!(box_["instance_initiated_shutdown_behavior"], "terminate");
    assert_eq!(box_["metadata_options"]["http_tokens"], "required");
    assert_eq!(box_["metadata_options"]["http_put_response_hop_limit"], 1);
    assert_eq!(box_["metadata_options"]["instance_metadata_tags"], "enabled");
    // Nothing on a box reached by SSH uses AWS: it gets no role, so IMDS holds no credentials.
    assert!(box_["iam_instance_profile"].is_null(), "{box_:#}");
    let root = &box_["block_device_mappings"][0];
    assert_eq!((root["volume_type"].as_str(), root["encrypted"].as_bool()), (Some("gp3"), Some(true)));
    assert_eq!((root["delete_on_termination"].as_bool(), root["size"].as_i64()), (Some(true), Some(8)));
    // Spot: one-time, terminate on interruption, max price = 0.5 x on-demand (0.0208).
    let request = &box_["launch_request"];
    assert_eq!(request["InstanceMarketOptions.MarketType"], "spot");
    assert_eq!(request["InstanceMarketOptions.SpotOptions.SpotInstanceType"], "one-time");
    assert_eq!(request["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"], "terminate");
    assert_eq!(request["InstanceMarketOptions.SpotOptions.MaxPrice"], "0.0104");
    assert!(request["ClientToken"].as_str().unwrap().starts_with(&format!("ea-{session}-")));

    // The same tags on instance, volume and spot request.
    let expected_tags = json!({
        "Name": format!("ephemeral-admin-{session}"),
        "Project": "EphemeralContainer",
        "AutoManaged": "true",
        "ephemeral-admin:session": session,
        "ephemeral-admin:owner": "arn:aws:sts::123456789012:user/moto",
        "ephemeral-admin:owner-id": "AIDAMOTOUSER0000000001",
        "ephemeral-admin:expires-at": out["expires_at"],
        "ephemeral-admin:mode": "kept",
        "CostCenter": "ops",
    });
    assert_eq!(box_["tags"], expected_tags);
    assert_eq!(root["tags"], expected_tags);
    let spot =
        state["spot_requests"].as_array().unwrap().iter().find(|s| s["instance_id"] == instance_id).unwrap();
    assert_eq!(spot["tags"], expected_tags);
    assert_eq!(spot["type"], "one-time");

    // SSH from the given address only, in the session's own group, tagged with the session.
    let group = session_group(&state, session);
    assert_eq!(group["tags"], expected_tags);
    assert_eq!(group["name"], format!("ephemeral-admin-sg-{session}"));
    assert_eq!(box_["security_group_ids"], json!([group["id"]]), "the box is in its own group only");
    let rules = group["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:#?}");
    assert_eq!(rules[0]["cidr_ipv4"], format!("{MY_IP}/32"));
    assert_eq!((rules[0]["from_port"].as_i64(), rules[0]["to_port"].as_i64()), (Some(22), Some(22)));
    assert_eq!(rules[0]["description"], format!("ephemeral-admin session {session}"));
    assert_eq!(rules[0]["tags"]["ephemeral-admin:session"], session);

    // The outside fail-safe.
    let alarms = state["alarms"].as_array().unwrap();
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0]["metric_name"], "NetworkIn");
    assert_eq!(alarms[0]["dimensions"]["InstanceId"], instance_id);
    assert_eq!(alarms[0]["comparison_operator"], "LessThanThreshold");
    assert_eq!(alarms[0]["alarm_actions"], json!(["arn:aws:automate:us-east-1:ec2:terminate"]));

    // The standing roles are `setup roles`'s, each under the tool's permissions boundary; the
    // Session Manager one trusts EC2 only and holds the SSM agent's channels only.
    let roles = state["iam"]["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 2, "{roles:#?}");
    for role in roles {
        assert_eq!(role["permissions_boundary"], "arn:aws:iam::123456789012:policy/ephemeral-admin-boundary");
    }
    let role = roles.iter().find(|r| r["name"] == "SystemAdminTestingRole-ssm").unwrap();
    assert_eq!(
        role["assume_role_policy_document"]["Statement"][0]["Principal"]["Service"],
        "ec2.amazonaws.com"
    );
    let policy = &role["inline_policies"]["ephemeral-admin-box"];
    assert_eq!(policy["Statement"].as_array().unwrap().len(), 1, "{policy:#}");
    assert_eq!(policy["Statement"][0]["Sid"], "SessionManagerAgent");

    // The user-data installs a first host key and the session's client key; the first
    // connection replaced that host key with the box's own, which the record pins.
    let user_data = box_["user_data"].as_str().unwrap();
    assert!(user_data.starts_with("#cloud-config\n") && user_data.contains("  ed25519_public: ssh-ed25519 "));
    let record_path = user.state_dir().join(format!("sessions/{session}/session.toml"));
    let record: toml::Value = toml::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    assert_eq!(record["host_key_state"].as_str(), Some("box"));
    let pinned: Vec<&str> = record["host_key_public"].as_str().unwrap().split_whitespace().take(2).collect();
    assert!(!user_data.contains(&pinned.join(" ")), "the pinned key is not the user-data's");
    assert!(user_data.contains(record["client_key_public"].as_str().unwrap().trim()));
    assert!(
        !user_data.contains("AWS_SECRET") && !user_data.contains("testing"),
        "no credentials in user-data"
    );
    let key = user.state_dir().join(format!("sessions/{session}/id_ed25519"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&record_path).unwrap().permissions().mode() & 0o777, 0o600);

    crate::foundation::assert_policy_covers(&cloud, &user);
}

#[test]
fn a_second_launch_reuses_role_and_profile_and_gets_its_own_group_and_rule() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.clear_log();
    let first = launch(&user, &[]);
    assert_eq!(cloud.count("CreateSecurityGroup"), 1, "the session's own group");
    cloud.clear_log();
    let second = launch(&user, &[]);
    assert_eq!(cloud.count("CreateSecurityGroup"), 1, "every session gets its own group");
    // A launch never writes IAM (a daily user may not): `setup roles` made what it uses.
    let iam_writes =
        ["CreateRole", "PutRolePolicy", "CreateInstanceProfile", "AddRoleToInstanceProfile", "CreatePolicy"];
    for create in iam_writes {
        assert_eq!(cloud.count(create), 0, "{create} must not run at launch: {:?}", cloud.actions());
    }
    // One round of lookups (the scheduler role), then RunInstances.
    assert_eq!(cloud.count("GetRole"), 1);
    assert_eq!(cloud.count("GetInstanceProfile"), 0);
    assert_eq!(cloud.count("DescribeSecurityGroups"), 0);

    // Same address: each session has its own group with its own rule, on its own box only.
    let (a, b) = (first["session_id"].as_str().unwrap(), second["session_id"].as_str().unwrap());
    let state = cloud.state();
    let (group_a, group_b) = (session_group(&state, a), session_group(&state, b));
    assert_ne!(group_a["id"], group_b["id"]);
    for group in [&group_a, &group_b] {
        let rules = group["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0]["cidr_ipv4"], format!("{MY_IP}/32"));
    }

    // list: both, from one tag-filtered DescribeInstances.
    cloud.clear_log();
    let listed = user.run(&["list", "--output", "json"]).success().json();
    let ids: Vec<&str> =
        listed["sessions"].as_array().unwrap().iter().map(|s| s["session_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&a) && ids.contains(&b));
    assert_eq!(cloud.count("DescribeInstances"), 1);
    let text = user.run(&["list"]).success().stdout;
    assert!(text.starts_with("ID ") && text.contains(a) && text.contains("running"), "{text}");

    // Ending the first revokes its rule and deletes its group; the second's access stays.
    let ended = user.run(&["terminate", a, "--output", "json"]).success().json();
    assert_eq!(ended["rules"][0][1], "revoked");
    assert_eq!(ended["group"], "deleted");
    assert_eq!(session_group(&cloud.state(), b)["ingress"].as_array().unwrap().len(), 1);
    assert!(leftovers(&cloud, a).is_empty(), "{:?}", leftovers(&cloud, a));
    let ended = user.run(&["terminate", b, "--output", "json"]).success().json();
    assert_eq!(ended["rules"][0][1], "revoked");
    assert!(own_groups(&cloud.state()).is_empty());
    assert!(leftovers(&cloud, b).is_empty(), "{:?}", leftovers(&cloud, b));
    assert!(!user.state_dir().join(format!("sessions/{b}/id_ed25519")).exists(), "key deleted");

    // status still knows an ended session; list no longer shows it.
    let status = user.run(&["status", b, "--output", "json"]).success().json();
    assert_eq!(status["state"], "terminated");
    assert!(
        user.run(&["list", "--output", "json"]).success().json()["sessions"].as_array().unwrap().is_empty()
    );
    assert_eq!(user.run(&["status", "zzzzzzzz"]).code, 1);
    assert_eq!(user.run(&["status", "../etc"]).code, 2);
}

#[test]
fn throttling_on_a_third_of_calls_still_launches() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "*", "error": "RequestLimitExceeded", "every": 3 }]));
    let out = launch(&user, &[]);
    assert_eq!(out["state"], "running");
    let throttled = cloud.calls().iter().filter(|c| c["injected"] == "error:RequestLimitExceeded").count();
    assert!(throttled >= 3, "the rule really throttled: {throttled}");
}

#[test]
fn capacity_errors_move_to_the_next_zone_then_the_next_type_then_on_demand() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // The cheapest zone has no capacity: the next cheapest zone of the same type.
    cloud.rules(json!([{ "action": "RunInstances", "match": { "Placement.AvailabilityZone": "us-east-1c" }, "error": "InsufficientInstanceCapacity" }]));
    let out = launch(&user, &[]);
    assert_eq!(
        (out["instance_type"].as_str(), out["availability_zone"].as_str()),
        (Some("t3.small"), Some("us-east-1a"))
    );
    assert_eq!(out["launch_attempts"], 2);

    // No t3.small spot anywhere: the next type's cheapest zone.
    cloud.rules(json!([
        { "action": "RunInstances", "match": { "InstanceType": "t3.small" }, "error": "InsufficientInstanceCapacity" }
    ]));
    let out = launch(&user, &[]);
    assert_eq!(
        (out["instance_type"].as_str(), out["availability_zone"].as_str()),
        (Some("t3.micro"), Some("us-east-1c"))
    );
    assert_eq!(out["market"], "spot");

    // No spot at all: on-demand of the first type.
    cloud.rules(json!([
        { "action": "RunInstances", "match": { "InstanceMarketOptions.MarketType": "spot" }, "error": "SpotMaxPriceTooLow" }
    ]));
    let out = launch(&user, &[]);
    assert_eq!(
        (out["instance_type"].as_str(), out["market"].as_str()),
        (Some("t3.small"), Some("on-demand"))
    );
    let box_ = instance(&cloud.state(), out["instance_id"].as_str().unwrap()).clone();
    assert!(box_["launch_request"].get("InstanceMarketOptions.MarketType").is_none());
}

#[test]
fn exhausted_capacity_exits_3_and_leaves_nothing() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "RunInstances", "error": "InsufficientInstanceCapacity" }]));
    let run = user.run(&["launch", "--detach", "--my-ip", MY_IP]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let line = run.stderr.lines().last().unwrap();
    assert_eq!(
        line,
        "error: no capacity anywhere: tried t3.small spot in us-east-1c, us-east-1a, us-east-1b, us-east-1d, us-east-1f \
         (InsufficientInstanceCapacity); t3.micro spot in us-east-1c, us-east-1a, us-east-1b, us-east-1d, us-east-1f \
         (InsufficientInstanceCapacity); t3.small on-demand (InsufficientInstanceCapacity); t3.micro on-demand \
         (InsufficientInstanceCapacity); try other --instance-type values, another --region, or later"
    );
    let state = cloud.state();
    assert!(state["instances"].as_array().unwrap().is_empty());
    assert!(
        own_groups(&state).is_empty(),
        "the session's group and rule are gone: {:#?}",
        own_groups(&state)
    );
    assert!(state["alarms"].as_array().unwrap().is_empty());
    let sessions = user.state_dir().join("sessions");
    let left: Vec<_> = std::fs::read_dir(&sessions).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "no local record or key: {left:?}");
}

#[test]
fn an_auth_error_on_run_instances_stops_at_once_and_revokes_the_rule() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "RunInstances", "error": "UnauthorizedOperation", "message": "not allowed to launch" }]));
    let run = user.run(&["launch", "--detach", "--my-ip", MY_IP]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(cloud.count("RunInstances"), 1, "no retry, no fallback");
    let line = run.stderr.lines().last().unwrap();
    assert!(
        line.contains("UnauthorizedOperation (ec2:RunInstances): not allowed to launch")
            && line.contains("ephemeral-admin policy"),
        "{line}"
    );
    assert!(own_groups(&cloud.state()).is_empty(), "the session's group went with its rule");
    assert_eq!(cloud.count("RevokeSecurityGroupIngress"), 1);
}

/// EC2's own words for an instance profile it cannot see yet (the code alone means any bad value).
const PROFILE_NOT_VISIBLE: &str = "Value (ephemeral-admin-box) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name";

#[test]
fn a_fresh_instance_profile_is_waited_for_and_server_errors_are_retried() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // IAM propagation: EC2 does not see the new profile for a moment.
    cloud.rules(json!([
        { "action": "RunInstances", "error": "InvalidParameterValue", "message": PROFILE_NOT_VISIBLE, "times": 1 },
        { "action": "RunInstances", "error": "InternalError", "times": 1 },
        { "action": "RunInstances", "drop": true, "times": 1 }
    ]));
    let out = launch(&user, &[]);
    assert_eq!(out["launch_attempts"], 4);
    assert_eq!(out["availability_zone"], "us-east-1c", "retries stay on the same candidate");
    let tokens: Vec<String> = cloud
        .calls()
        .iter()
        .filter(|c| c["action"] == "RunInstances")
        .map(|c| c["params"]["ClientToken"].as_str().unwrap().to_string())
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] == w[1]), "one idempotency token across retries: {tokens:?}");

    // The profile exists already (another launch made it seconds ago), yet EC2 does not see it:
    // still waited for, whoever created it (issue #12, item 8).
    cloud.clear_log();
    cloud.rules(json!([
        { "action": "RunInstances", "error": "InvalidParameterValue", "message": PROFILE_NOT_VISIBLE, "times": 1 }
    ]));
    let out = launch(&user, &[]);
    assert_eq!(out["launch_attempts"], 2);
    assert_eq!(cloud.count("CreateInstanceProfile"), 0, "the profile was not made by this launch");
}

#[test]
fn only_the_profile_error_is_waited_for_other_bad_parameters_stop_at_once() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // EC2's InvalidParameterValue, but the bad value is not the profile: no wait can fix it
    // (issue #12, item 8).
    cloud.rules(json!([{ "action": "RunInstances", "error": "InvalidParameterValue",
        "message": "Value (abc) for parameter userData is invalid. Invalid BASE64 encoding of user data.", "times": 1 }]));
    let run = user.run(&["launch", "--detach", "--my-ip", MY_IP]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(cloud.count("RunInstances"), 1, "no retry");
    assert!(run.stderr.lines().last().unwrap().contains("parameter userData is invalid"), "{}", run.stderr);
}

#[test]
fn a_lost_run_instances_answer_is_retried_with_the_same_token_and_yields_one_instance() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // EC2 starts the instance, the answer never arrives (issue #12, item 8).
    cloud.rules(json!([{ "action": "RunInstances", "drop_after": true, "times": 1 }]));
    let out = launch(&user, &[]);
    assert_eq!(out["launch_attempts"], 2);
    let runs: Vec<Value> = cloud.calls().into_iter().filter(|c| c["action"] == "RunInstances").collect();
    assert_eq!(runs[0]["injected"], "drop_after");
    assert_eq!(runs[0]["params"]["ClientToken"], runs[1]["params"]["ClientToken"]);
    let state = cloud.state();
    let ids: Vec<&Value> = state["instances"].as_array().unwrap().iter().map(|i| &i["id"]).collect();
    assert_eq!(ids, [&out["instance_id"]], "exactly one instance, the one the retry was told about");
    let session = out["session_id"].as_str().unwrap();
    user.run(&["terminate", session]).success();
    assert!(leftovers(&cloud, session).is_empty());
}

#[test]
fn a_launch_whose_answers_are_all_lost_still_removes_the_instance_it_started() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "RunInstances", "drop_after": true }]));
    let run = user.run(&["launch", "--detach", "--my-ip", MY_IP]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let state = cloud.state();
    let instances = state["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "one token, one instance: {instances:#?}");
    let session = instances[0]["tags"]["ephemeral-admin:session"].as_str().unwrap();
    assert!(leftovers(&cloud, session).is_empty(), "{:?}\n{}", leftovers(&cloud, session), run.stderr);
}

/// A launch that fails after RunInstances answered (the box never runs within the connect
/// timeout), so the failed launch terminates an instance EC2 may not see yet.
fn launch_that_times_out(cloud: &LocalCloud, user: &User) -> crate::support::cli::Run {
    cloud.config(json!({ "pending_seconds": 120 }));
    user.env("EPHEMERAL_ADMIN_CONNECT_TIMEOUT", "1s").run(&["launch", "--detach", "--my-ip", MY_IP])
}

#[test]
fn terminate_not_found_right_after_launch_is_retried_not_taken_for_success() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(
        json!([{ "action": "TerminateInstances", "error": "InvalidInstanceID.NotFound", "times": 2 }]),
    );
    let run = launch_that_times_out(&cloud, &user);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(cloud.count("TerminateInstances"), 3, "retried until EC2 saw it");
    let state = cloud.state();
    let instance = &state["instances"][0];
    assert_eq!(instance["state"], "terminated", "{}", run.stderr);
    let session = instance["tags"]["ephemeral-admin:session"].as_str().unwrap();
    assert!(leftovers(&cloud, session).is_empty(), "{:?}", leftovers(&cloud, session));
}

#[test]
fn an_instance_ec2_never_sees_is_reported_not_terminated_and_keeps_its_nets() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "TerminateInstances", "error": "InvalidInstanceID.NotFound" }]));
    let run = launch_that_times_out(&cloud, &user);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(cloud.count("TerminateInstances") > 2, "retried with backoff");
    assert!(run.stderr.contains("EC2 still does not see it after 30s"), "{}", run.stderr);
    let state = cloud.state();
    let instance = &state["instances"][0];
    assert_ne!(instance["state"], "terminated");
    let session = instance["tags"]["ephemeral-admin:session"].as_str().unwrap();
    assert!(!run.stderr.contains("terminated i-"), "{}", run.stderr);
    assert_eq!(state["alarms"].as_array().unwrap().len(), 1, "the alarm stays as the box's net");
    let dir = user.state_dir().join("sessions").join(session);
    assert!(dir.join("session.toml").exists() && dir.join("id_ed25519").exists(), "record and key stay");
}

#[test]
fn the_caller_ip_is_detected_from_echo_services() {
    let cloud = LocalCloud::start();
    let echo = EchoServer::start("198.51.100.23\n");
    let garbage = EchoServer::start("<html>captive portal</html>");
    let user = User::new(&cloud).env("EPHEMERAL_ADMIN_IP_SERVICES", &format!("{},{}", garbage.url, echo.url));
    let out = user.run(&["launch", "--detach", "--output", "json"]).success().json();
    let rules = session_group(&cloud.state(), out["session_id"].as_str().unwrap())["ingress"].clone();
    assert_eq!(rules[0]["cidr_ipv4"], "198.51.100.23/32");
    user.run(&["terminate", out["session_id"].as_str().unwrap()]).success();

    // Nothing usable: one line naming --my-ip, and nothing created for a session.
    let user = User::new(&cloud).env("EPHEMERAL_ADMIN_IP_SERVICES", &garbage.url);
    cloud.clear_log();
    let run = user.run(&["launch", "--detach"]);
    assert_eq!(run.code, 2, "nothing was created: fix the environment");
    assert!(
        run.stderr.contains("cannot detect your public IP") && run.stderr.contains("--my-ip"),
        "{}",
        run.stderr
    );
    assert_eq!(cloud.count("RunInstances"), 0);
    assert_eq!(cloud.count("AuthorizeSecurityGroupIngress"), 0);
}

/// A loopback HTTP server standing in for an IP echo service.
struct EchoServer {
    url: String,
}

impl EchoServer {
    fn start(body: &'static str) -> EchoServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        EchoServer { url }
    }
}

#[test]
fn an_instance_launched_moments_ago_that_ec2_does_not_show_yet_is_not_taken_for_gone() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    // A detached launch a second ago whose instance DescribeInstances does not return yet.
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    let dir = user.state_dir().join("sessions/justrvn2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("session.toml"),
        format!(
            "id = \"justrvn2\"\nregion = \"us-east-1\"\nowner_arn = \"arn:aws:sts::123456789012:user/moto\"\n\
             created_at = \"{now}\"\nlaunched_at = \"{now}\"\nexpires_at = \"{deadline}\"\nkept = true\n\
             user = \"ubuntu\"\nhost_key_public = \"\"\nhost_key_fingerprint = \"\"\nclient_key_public = \"\"\n\
             instance_id = \"i-0123456789abcdef0\"\ninstance_type = \"t3.small\"\nprice_per_hour = 0.01\n",
            now = fmt(now),
            deadline = fmt(now + time::Duration::hours(4)),
        ),
    )
    .unwrap();
    std::fs::write(dir.join("id_ed25519"), "KEY").unwrap();
    user.run(&["list"]).success();
    let record = std::fs::read_to_string(dir.join("session.toml")).unwrap();
    assert!(!record.contains("ended_at"), "not settled as ended: {record}");
    assert!(dir.join("id_ed25519").exists(), "its key stays");
    assert!(!user.state_dir().join("ledger.jsonl").exists());
    let out = user.run(&["cleanup", "--dry-run", "--output", "json"]).success().json();
    let verdict = out["sessions"].as_array().unwrap().iter().find(|s| s["session_id"] == "justrvn2").cloned();
    let verdict = verdict.expect("listed");
    assert_eq!(verdict["action"], "kept", "{verdict}");
    assert!(verdict["reason"].as_str().unwrap().starts_with("launching"), "{verdict}");
    let run = user.run(&["connect", "justrvn2"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("is not visible to EC2 yet: try again in a few seconds"), "{}", run.stderr);
}
