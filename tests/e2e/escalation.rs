//! No path from the tool's policies to account admin: each route a security reviewer (and
//! cloudsplaining) finds is tried against the local cloud enforcing the printed policy, and
//! denied. The daily policy holds no IAM write at all; the bootstrap policy's role writes are
//! bound to the tool's permissions boundary, which it can neither widen nor remove.

use serde_json::json;

use crate::support::cloud::{admin_policy, printed};
use crate::support::{LocalCloud, User};

const SSM_ROLE: &str = "SystemAdminTestingRole-ssm";
const SCHEDULER_ROLE: &str = "SystemAdminTestingRole-scheduler";
const BOUNDARY: &str = "arn:aws:iam::123456789012:policy/ephemeral-admin-boundary";
const ADMIN: &str =
    r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}"#;
/// A trust policy that lets another account assume the role: a backdoor that outlives us.
const OUTSIDE_TRUST: &str = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::999999999999:root"}, "Action": "sts:AssumeRole"}]}"#;

fn lines(out: &str) -> Vec<&str> {
    out.lines().collect()
}

#[test]
fn a_daily_user_cannot_write_a_role_or_pass_one_the_tool_did_not_make() {
    let cloud = LocalCloud::start();
    cloud.enforce_narrower(&printed(&[]));
    // An admin role with a profile of the same name, as an administrator might have.
    cloud.admin_ec2(&format!(
        "iam.create_role(RoleName='AdminWorkRole', AssumeRolePolicyDocument=json.dumps({{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Principal': {{'Service': 'ec2.amazonaws.com'}}, 'Action': 'sts:AssumeRole'}}]}}))\n\
         iam.put_role_policy(RoleName='AdminWorkRole', PolicyName='admin', PolicyDocument='{ADMIN}')\n\
         iam.create_instance_profile(InstanceProfileName='AdminWorkRole')\n\
         iam.add_role_to_instance_profile(InstanceProfileName='AdminWorkRole', RoleName='AdminWorkRole')"
    ));
    let image = cloud.admin_ec2("print(ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId'])");
    let out = cloud.as_cli_user(&format!(
        "admin = '{ADMIN}'\n\
         attempt(iam.put_role_policy, RoleName='{SSM_ROLE}', PolicyName='x', PolicyDocument=admin)\n\
         attempt(iam.put_role_policy, RoleName='{SCHEDULER_ROLE}', PolicyName='x', PolicyDocument=admin)\n\
         attempt(iam.attach_role_policy, RoleName='{SSM_ROLE}', PolicyArn='arn:aws:iam::aws:policy/AdministratorAccess')\n\
         attempt(iam.update_assume_role_policy, RoleName='{SSM_ROLE}', PolicyDocument='{OUTSIDE_TRUST}')\n\
         attempt(iam.delete_role, RoleName='{SCHEDULER_ROLE}')\n\
         attempt(iam.create_role, RoleName='{SCHEDULER_ROLE}', AssumeRolePolicyDocument='{OUTSIDE_TRUST}')\n\
         attempt(iam.delete_role_permissions_boundary, RoleName='{SSM_ROLE}')\n\
         attempt(iam.create_policy_version, PolicyArn='{BOUNDARY}', PolicyDocument=admin, SetAsDefault=True)\n\
         own = [{{'Key': 'Project', 'Value': 'EphemeralContainer'}}, {{'Key': 'ephemeral-admin:owner-id', 'Value': 'AIDAMOTOUSER0000000001'}}]\n\
         tags = [{{'ResourceType': t, 'Tags': own}} for t in ('instance', 'volume')]\n\
         attempt(ec2.run_instances, ImageId='{image}', MinCount=1, MaxCount=1, InstanceType='t3.micro', IamInstanceProfile={{'Name': 'AdminWorkRole'}}, TagSpecifications=tags)"
    ));
    // Every IAM write: AWS's AccessDenied; the launch with someone else's role: EC2's.
    assert_eq!(
        lines(&out),
        [
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "UnauthorizedOperation"
        ],
        "{out}"
    );
    let denials = cloud.denials();
    let passrole = denials.last().unwrap();
    assert_eq!(passrole["action"], "iam:PassRole", "{denials:#?}");
    assert_eq!(passrole["resource"], "arn:aws:iam::123456789012:role/AdminWorkRole");
    // Nothing changed: the roles are as `setup roles` made them, under the boundary.
    let state = cloud.state();
    for name in [SSM_ROLE, SCHEDULER_ROLE] {
        let role = state["iam"]["roles"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(role["permissions_boundary"], BOUNDARY, "{role:#}");
        assert!(!role["inline_policies"].to_string().contains("\"Action\":\"*\""), "{role:#}");
    }
    assert!(state["instances"].as_array().unwrap().is_empty());
}

#[test]
fn the_bootstrap_policy_writes_roles_only_under_the_boundary_and_never_widens_it() {
    let cloud = LocalCloud::start();
    cloud.enforce_narrower(&admin_policy());
    let out = cloud.as_cli_user(&format!(
        "admin = '{ADMIN}'\n\
         attempt(iam.create_role, RoleName='{SCHEDULER_ROLE}x', AssumeRolePolicyDocument='{OUTSIDE_TRUST}')\n\
         attempt(iam.delete_role_policy, RoleName='{SCHEDULER_ROLE}', PolicyName='ephemeral-admin-scheduler')\n\
         attempt(iam.delete_role, RoleName='{SCHEDULER_ROLE}')\n\
         attempt(iam.create_role, RoleName='{SCHEDULER_ROLE}', AssumeRolePolicyDocument='{OUTSIDE_TRUST}')\n\
         attempt(iam.create_role, RoleName='{SCHEDULER_ROLE}', AssumeRolePolicyDocument='{OUTSIDE_TRUST}', PermissionsBoundary='arn:aws:iam::aws:policy/AdministratorAccess')\n\
         attempt(iam.delete_role_permissions_boundary, RoleName='{SSM_ROLE}')\n\
         attempt(iam.put_role_permissions_boundary, RoleName='{SSM_ROLE}', PermissionsBoundary='arn:aws:iam::aws:policy/AdministratorAccess')\n\
         attempt(iam.create_policy_version, PolicyArn='{BOUNDARY}', PolicyDocument=admin, SetAsDefault=True)\n\
         attempt(iam.set_default_policy_version, PolicyArn='{BOUNDARY}', VersionId='v1')\n\
         attempt(iam.delete_policy, PolicyArn='{BOUNDARY}')\n\
         attempt(iam.put_role_policy, RoleName='{SSM_ROLE}', PolicyName='x', PolicyDocument=admin)"
    ));
    assert_eq!(
        lines(&out),
        [
            // Only the tool's role names.
            "AccessDenied",
            // Removing a role is fine (`cleanup --purge`)...
            "ok",
            "ok",
            // ...but it comes back only under the boundary.
            "AccessDenied",
            "AccessDenied",
            // The boundary stays, as it is.
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            "AccessDenied",
            // A role under the boundary takes any inline policy: the boundary still bounds it.
            "ok"
        ],
        "{out}"
    );
    // A role an older version made without the boundary takes no policy until `setup roles`
    // puts it under the boundary.
    cloud.admin_ec2(&format!("iam.delete_role_permissions_boundary(RoleName='{SSM_ROLE}')"));
    let out = cloud.as_cli_user(&format!(
        "attempt(iam.put_role_policy, RoleName='{SSM_ROLE}', PolicyName='x', PolicyDocument='{ADMIN}')"
    ));
    assert_eq!(out, "AccessDenied");
    User::new(&cloud).run(&["setup", "roles"]).success();
    let state = cloud.state();
    let role = state["iam"]["roles"].as_array().unwrap().iter().find(|r| r["name"] == SSM_ROLE).unwrap();
    assert_eq!(role["permissions_boundary"], BOUNDARY, "{role:#}");
}

#[test]
fn an_account_without_the_standing_roles_gets_one_line_naming_setup_roles_and_nothing_is_made() {
    let cloud = LocalCloud::start_fresh_account(&["--box-sim"], &[]);
    let user = User::new(&cloud);
    let run = user.run(&["launch", "--detach", "--my-ip", "203.0.113.7"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let line = run.stderr.lines().last().unwrap();
    assert!(line.contains("SystemAdminTestingRole-scheduler"), "{line}");
    assert!(line.contains("`ephemeral-admin setup roles`") && line.contains("policy --bootstrap"), "{line}");
    assert_eq!(run.stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "{}", run.stderr);
    let state = cloud.state();
    assert!(state["instances"].as_array().unwrap().is_empty());
    assert!(state["security_groups"].as_array().unwrap().iter().all(|g| g["name"] == "default"), "{state:#}");

    // `doctor` says so too, with the fix.
    let roles = |user: &User| {
        let doctor = user.run(&["doctor", "--output", "json"]).json();
        doctor["checks"].as_array().unwrap().iter().find(|c| c["name"] == "roles").unwrap().clone()
    };
    let check = roles(&user);
    assert_eq!(check["ok"], false, "{check:#}");
    assert!(check["fix"].as_str().unwrap().contains("setup roles"), "{check:#}");

    // A daily user cannot make them: one line naming the bootstrap policy.
    let run = user.run(&["setup", "roles"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = run.stderr.lines().last().unwrap();
    assert!(line.contains("AccessDenied") && line.contains("policy --bootstrap"), "{line}");
    cloud.enforce_narrower(&admin_policy());

    // An admin holding the bootstrap policy makes them (twice is fine), then the launch works.
    let made = user.run(&["setup", "roles", "--output", "json"]).success().json();
    assert_eq!(made["boundary"], BOUNDARY, "{made:#}");
    user.run(&["setup", "roles"]).success();
    cloud.enforce(&printed(&[]));
    assert_eq!(roles(&user)["ok"], true);
    let out =
        user.run(&["launch", "--detach", "--my-ip", "203.0.113.7", "--output", "json"]).success().json();
    // A box reached by SSH has no role at all: IMDS holds no credentials.
    let state = cloud.state();
    let box_ = state["instances"].as_array().unwrap().iter().find(|i| i["id"] == out["instance_id"]).unwrap();
    assert!(box_["iam_instance_profile"].is_null(), "{box_:#}");
    user.run(&["terminate", out["session_id"].as_str().unwrap()]).success();
    assert_eq!(cloud.denials(), Vec::<serde_json::Value>::new());
    let _ = json!(null);
}
