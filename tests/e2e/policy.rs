//! The printed IAM policies against a local cloud that enforces them: a launch fails the way AWS
//! fails it when one permission is missing, SSM boxes get Session Manager's role while the user
//! may start sessions only on the tool's boxes, and `policy --validate` asks Access Analyzer.

use serde_json::{Value, json};

use crate::launch::leftovers;
use crate::support::cloud::printed_policy;
use crate::support::{LocalCloud, User};

const MY_IP: &str = "203.0.113.7";

/// The printed policy with one statement, or one action of it, removed.
fn without(sid: &str, action: Option<&str>) -> Value {
    let mut policy = printed_policy();
    let statements = policy["Statement"].as_array_mut().unwrap();
    let index = statements.iter().position(|s| s["Sid"] == sid).unwrap_or_else(|| panic!("no {sid}"));
    match action {
        None => {
            statements.remove(index);
        }
        Some(action) => {
            let actions = statements[index]["Action"].as_array_mut().unwrap();
            let before = actions.len();
            actions.retain(|a| a != action);
            assert_eq!(actions.len() + 1, before, "{sid} grants {action}");
        }
    }
    policy
}

#[test]
fn a_launch_missing_one_permission_fails_with_the_aws_denial_and_leaves_nothing() {
    // (statement, action removed from it or the whole statement, the denied IAM action, AWS's code)
    let cases = [
        ("OwnAlarmsOnly", Some("cloudwatch:TagResource"), "cloudwatch:TagResource", "AccessDenied"),
        ("TagOnlyWhileCreating", None, "ec2:CreateTags", "UnauthorizedOperation"),
        ("ReadStandingRoles", Some("iam:GetRole"), "iam:GetRole", "AccessDenied"),
    ];
    for (sid, action, denied_action, code) in cases {
        let cloud = LocalCloud::start();
        let user = User::new(&cloud);
        cloud.enforce_narrower(&without(sid, action));
        let run = user.run(&["launch", "--detach", "--my-ip", MY_IP]);
        assert_eq!(run.code, 1, "{sid}: {}", run.stderr);

        // The local cloud answered as AWS does: 403 with the AWS code, naming the action.
        let denials = cloud.denials();
        assert!(!denials.is_empty(), "{sid}: nothing was denied");
        assert_eq!(denials[0]["action"], denied_action, "{sid}: {denials:#?}");
        let denied_call = cloud.calls().into_iter().find(|c| c["seq"] == denials[0]["seq"]).unwrap();
        assert_eq!(denied_call["status"], 403, "{denied_call:#}");

        // One line for the human: the AWS code, the missing permission, where the policy is.
        let line = run.stderr.lines().last().unwrap();
        assert!(line.starts_with("error"), "{sid}: {}", run.stderr);
        assert!(line.contains(code) && line.contains(denied_action), "{sid}: {line}");
        assert!(line.contains("ephemeral-admin policy"), "{sid}: {line}");

        // Nothing is left: the launch undid what it had made.
        let session = session_of(&cloud).unwrap_or_default();
        assert_eq!(leftovers(&cloud, &session), Vec::<String>::new(), "{sid}");
        let live = cloud.state()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] != "terminated")
            .count();
        assert_eq!(live, 0, "{sid}: no instance survives");
    }
}

/// The session id the launch tagged its resources with (from its RunInstances request), if it
/// got that far.
fn session_of(cloud: &LocalCloud) -> Option<String> {
    cloud.calls().into_iter().filter(|c| c["action"] == "RunInstances").find_map(|c| {
        let params = c["params"].as_object()?.clone();
        let key = params.iter().find(|(_, v)| *v == "ephemeral-admin:session")?.0.replace(".Key", ".Value");
        params.get(&key)?.as_str().map(str::to_string)
    })
}

#[test]
fn an_ssm_launch_gets_the_session_manager_role_and_start_session_is_scoped_to_our_boxes() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    user.write_config("connect = \"ssm\"\n");
    // Every launch connects once (the box gets its own host key), and the local cloud has no
    // Session Manager to connect through: the launch is killed just before its first connection,
    // with the box and its role made.
    let killed =
        user.command(&["launch", "--detach"]).env("EPHEMERAL_ADMIN_ABORT_AFTER", "connecting").output();
    let killed = killed.unwrap();
    assert_eq!(killed.status.code(), None, "killed: {}", String::from_utf8_lossy(&killed.stderr));
    let id = cloud.state()["instances"][0]["id"].as_str().unwrap().to_string();
    let instance_id = id.as_str();

    // The box runs with the SSM role, whose policy is what `policy --box` prints for SSM.
    let state = cloud.state();
    let box_ = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == instance_id).unwrap();
    assert_eq!(box_["iam_instance_profile"]["name"], "SystemAdminTestingRole-ssm");
    let roles = state["iam"]["roles"].as_array().unwrap();
    let role = roles.iter().find(|r| r["name"] == "SystemAdminTestingRole-ssm").expect("the SSM role");
    let attached = &role["inline_policies"]["ephemeral-admin-box"];
    let printed: Value = serde_json::from_str(&user.run(&["policy", "--box"]).success().stdout).unwrap();
    assert_eq!(attached, &printed, "`policy --box` prints the attached policy");
    let agent = attached["Statement"].as_array().unwrap().iter().find(|s| s["Sid"] == "SessionManagerAgent");
    let agent_actions: Vec<&str> = agent.expect("Session Manager statement")["Action"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for needed in [
        "ssm:UpdateInstanceInformation",
        "ssmmessages:CreateControlChannel",
        "ssmmessages:OpenDataChannel",
        "ec2messages:GetMessages",
    ] {
        assert!(agent_actions.contains(&needed), "{needed}: {agent_actions:?}");
    }
    // Boxes reached by SSH get no role at all.
    assert!(roles.iter().all(|r| r["name"] != "SystemAdminTestingRole"), "{roles:#?}");

    // With a box of the tool's to try them on, doctor's dry runs pass the scoped policy.
    let report = user.run(&["doctor", "--output", "json"]).success().json();
    for name in [
        "permission:RunInstances",
        "permission:TerminateInstances",
        "permission:AuthorizeSecurityGroupIngress",
    ] {
        let check = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        assert_eq!(check["detail"], "allowed (dry run)", "{report:#}");
    }

    // The user may start a session on this box with the SSH document, and on nothing else.
    let start = |target: &str, document: &str| {
        cloud.simulate("ssm", "StartSession", json!({ "Target": target, "DocumentName": document }))
    };
    let ours = start(instance_id, "AWS-StartSSHSession");
    assert_eq!(ours["allowed"], true, "{ours:#}");
    assert_eq!(start(instance_id, "AWS-RunShellScript")["allowed"], false, "another document");
    assert_eq!(start("i-0123456789abcdef0", "AWS-StartSSHSession")["allowed"], false, "an unknown instance");
    cloud.retag(instance_id, "Project", "SomethingElse");
    let foreign = start(instance_id, "AWS-StartSSHSession");
    assert_eq!(foreign["allowed"], false, "{foreign:#}");
    assert!(
        foreign["checks"][0]["resource"].as_str().unwrap().ends_with(&format!(":instance/{instance_id}"))
    );

    // Everything the SSM launch did was allowed by the printed policy.
    crate::foundation::assert_policy_covers(&cloud, &user);
}

#[test]
fn policy_validate_asks_access_analyzer_and_prints_its_findings() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    for args in [
        &["policy", "--validate", "--output", "json"][..],
        &["policy", "--box", "--validate", "--output", "json"],
    ] {
        let report = user.run(args).success().json();
        assert_eq!(report["ok"], true, "{report:#}");
        assert_eq!(report["findings"], json!([]), "{report:#}");
    }
    let text = user.run(&["policy", "--validate"]).success().stdout;
    assert!(text.contains("no findings"), "{text}");
    let calls: Vec<Value> = cloud.calls().into_iter().filter(|c| c["service"] == "access-analyzer").collect();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert_eq!(calls[0]["action"], "ValidatePolicy");
    assert_eq!(calls[0]["json"]["policyType"], "IDENTITY_POLICY");
    let sent: Value = serde_json::from_str(calls[0]["json"]["policyDocument"].as_str().unwrap()).unwrap();
    assert_eq!(sent, printed_policy(), "the printed policy is what gets validated");

    // Without access-analyzer:ValidatePolicy the user is told so.
    cloud.enforce_narrower(&without("ReadOnly", Some("access-analyzer:ValidatePolicy")));
    let run = user.run(&["policy", "--validate"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("AccessDeniedException") && run.stderr.contains("access-analyzer:ValidatePolicy"),
        "{}",
        run.stderr
    );
}
