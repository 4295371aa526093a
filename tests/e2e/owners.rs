//! One user cannot touch another's box, and AWS, not our code, is what says so: every resource a
//! launch makes carries its creator's `aws:userid` (owner-id tag, required on create by the
//! printed policy), and every write needs the caller's own. The CLI refuses first, in one line,
//! unless `--force`; a team admin's policy (`policy --team-admin`) is what lets `--force` work.

use serde_json::Value;

use crate::session::{assert_nothing_left, launch_detached, proxy};
use crate::support::cloud::printed;
use crate::support::{LocalCloud, User};

const ALICE_ID: &str = "AIDAMOTOUSER0000000001";

fn instance<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap()
}

#[test]
fn a_teammate_can_neither_end_nor_open_nor_retag_anothers_box() {
    let cloud = LocalCloud::start();
    let proxy = proxy(&cloud);
    let alice = User::new(&cloud);
    let bob = User::new(&cloud).env("AWS_ACCESS_KEY_ID", "testing-bob");
    let out = launch_detached(&alice, &proxy, &[]);
    let (id, box_id) = (out["session_id"].as_str().unwrap(), out["instance_id"].as_str().unwrap());
    let state = cloud.state();
    let tags = &instance(&state, box_id)["tags"];
    assert_eq!(tags["ephemeral-admin:owner-id"], ALICE_ID, "{tags:#}");
    let group = out["security_group_id"].as_str().map(str::to_string).unwrap_or_else(|| {
        state["security_groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["tags"]["ephemeral-admin:session"] == id)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    });

    // The CLI refuses first: one line naming the owner and --force, nothing touched.
    let run = bob.run(&["terminate", id]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let line = run.stderr.lines().last().unwrap();
    assert!(
        line.contains(ALICE_ID) && line.contains("--force") && line.contains("policy --team-admin"),
        "{line}"
    );
    // With --force, AWS refuses: bob's policy is the daily one.
    cloud.enforce_narrower(&printed(&[]));
    let run = bob.run(&["terminate", id, "--force"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(said.contains("UnauthorizedOperation") && said.contains("ec2:TerminateInstances"), "{said}");

    // Straight at the API, every write on alice's resources is denied.
    let alarm = format!("ephemeral-admin-{id}-{box_id}");
    let out = cloud.as_principal(
        "testing-bob",
        &format!(
            "mine = [{{'ResourceType': 'security-group-rule', 'Tags': [{{'Key': 'Project', 'Value': 'EphemeralContainer'}}, {{'Key': 'ephemeral-admin:owner-id', 'Value': 'AIDABOBUSER00000000002'}}]}}]\n\
             attempt(ec2.terminate_instances, InstanceIds=['{box_id}'])\n\
             attempt(ec2.create_tags, Resources=['{box_id}'], Tags=[{{'Key': 'ephemeral-admin:expires-at', 'Value': '2020-01-01T00:00:00Z'}}])\n\
             attempt(ec2.authorize_security_group_ingress, GroupId='{group}', IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': 22, 'ToPort': 22, 'IpRanges': [{{'CidrIp': '0.0.0.0/0'}}]}}], TagSpecifications=mine)\n\
             attempt(ec2.delete_security_group, GroupId='{group}')\n\
             attempt(cw.delete_alarms, AlarmNames=['{alarm}'])\n\
             attempt(cw.put_metric_alarm, AlarmName='{alarm}', MetricName='CPUUtilization', Namespace='AWS/EC2', Statistic='Average', Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator='GreaterThanThreshold', Tags=[{{'Key': 'ephemeral-admin:owner-id', 'Value': 'AIDABOBUSER00000000002'}}])"
        ),
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "UnauthorizedOperation",
            "UnauthorizedOperation",
            "UnauthorizedOperation",
            "UnauthorizedOperation",
            "AccessDenied",
            "AccessDenied"
        ],
        "{out}"
    );
    // `cleanup --all` is bob's own sessions only: alice's is not even listed.
    let report = bob.run(&["cleanup", "--all", "--output", "json"]).success().json();
    assert!(report["sessions"].as_array().unwrap().is_empty(), "{report:#}");
    let state = cloud.state();
    assert_eq!(instance(&state, box_id)["state"], "running");
    assert_eq!(instance(&state, box_id)["tags"], *tags, "no tag changed");

    // Alice ends her own.
    cloud.enforce(&printed(&[]));
    alice.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn people_on_one_shared_role_are_told_apart_by_their_session_names() {
    let cloud = LocalCloud::start();
    let proxy = proxy(&cloud);
    let alice = User::new(&cloud).env("AWS_ACCESS_KEY_ID", "testing-shared-alice");
    let bob = User::new(&cloud).env("AWS_ACCESS_KEY_ID", "testing-shared-bob");
    let out = launch_detached(&alice, &proxy, &[]);
    let (id, box_id) = (out["session_id"].as_str().unwrap(), out["instance_id"].as_str().unwrap());
    let tags = &instance(&cloud.state(), box_id)["tags"].clone();
    // One owner to show (the role), two people to AWS.
    assert_eq!(tags["ephemeral-admin:owner"], "arn:aws:iam::123456789012:role/SharedAdmin");
    assert_eq!(tags["ephemeral-admin:owner-id"], "AROASHAREDADMIN0000003:alice");

    let report = bob.run(&["cleanup", "--all", "--output", "json"]).success().json();
    assert!(report["sessions"].as_array().unwrap().is_empty(), "{report:#}");
    let run = bob.run(&["terminate", id]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("AROASHAREDADMIN0000003:alice"), "{}", run.stderr);
    assert_eq!(instance(&cloud.state(), box_id)["state"], "running");
    alice.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn a_team_admin_ends_a_teammates_box_with_force() {
    let cloud = LocalCloud::start();
    let proxy = proxy(&cloud);
    let alice = User::new(&cloud);
    let admin = User::new(&cloud).env("AWS_ACCESS_KEY_ID", "testing-bob");
    let out = launch_detached(&alice, &proxy, &[]);
    let id = out["session_id"].as_str().unwrap();
    let mut policy = printed(&[]);
    let team = printed(&["--team-admin"]);
    policy["Statement"].as_array_mut().unwrap().extend(team["Statement"].as_array().unwrap().iter().cloned());
    cloud.enforce(&policy);
    let run = admin.run(&["terminate", id, "--force"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_nothing_left(&cloud);
}

#[test]
fn session_manager_reaches_only_ones_own_boxes() {
    let cloud = LocalCloud::start();
    let alice = User::new(&cloud);
    let out = crate::session::ssm_box(&cloud, &alice);
    let box_id = out["instance_id"].as_str().unwrap();
    cloud.enforce_narrower(&printed(&[]));
    let start = format!(
        "attempt(ssm.start_session, Target='{box_id}', DocumentName='AWS-StartSSHSession', Parameters={{'portNumber': ['22']}})"
    );
    assert_eq!(cloud.as_principal("testing-bob", &start), "AccessDeniedException");
    let denied = cloud.denials();
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0]["action"], "ssm:StartSession");
    assert!(denied[0]["resource"].as_str().unwrap().ends_with(box_id), "{denied:#?}");
    // The owner's own start is not denied (whatever moto answers after).
    cloud.as_principal("testing", &start);
    assert_eq!(cloud.denials().len(), 1, "{:#?}", cloud.denials());
    alice.run(&["terminate", out["session_id"].as_str().unwrap()]).success();
}
