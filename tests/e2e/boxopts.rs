//! What the box is made of: `--on-demand` (no spot at all), the root volume's size and type, and
//! the user's own instance profile in place of the tool's minimal role, with the printed policy
//! (which the local cloud enforces) passing exactly that profile's role.

use std::process::Command;

use serde_json::Value;

use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::cloud::python;
use crate::support::{LocalCloud, User};

fn instance<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).expect("the instance")
}

#[test]
fn on_demand_skips_spot_entirely_from_the_flag_or_the_config() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let out = launch_detached(&user, &proxy, &["--on-demand"]);
    assert_eq!(out["market"], "on-demand", "{out}");
    let state = cloud.state();
    let box_ = instance(&state, out["instance_id"].as_str().unwrap());
    assert!(box_["launch_request"].get("InstanceMarketOptions.MarketType").is_none(), "{box_}");
    assert_eq!(cloud.count("DescribeSpotPriceHistory"), 0, "no spot price lookup");
    assert_eq!(cloud.count("RunInstances"), 1, "straight to on-demand");
    user.run(&["terminate", out["session_id"].as_str().unwrap()]).success();

    user.write_config("on_demand = true\n");
    let out = launch_detached(&user, &proxy, &[]);
    assert_eq!(out["market"], "on-demand", "{out}");
    user.run(&["terminate", "last"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn root_volume_size_and_type_are_checked_first_launched_encrypted_and_priced() {
    let offline = User::offline();
    for (flag, value, says) in [
        ("--root-volume-gb", "4", "expected whole GB from 8 to 16384"),
        ("--root-volume-gb", "16385", "expected whole GB from 8 to 16384"),
        ("--root-volume-type", "io2", "needs provisioned IOPS"),
        ("--root-volume-type", "st1", "expected gp3 or gp2"),
    ] {
        let run = offline.run(&["launch", flag, value, "--my-ip", "203.0.113.7"]);
        assert_eq!(run.code, 2, "{flag} {value}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{flag} {value}: {}", run.stderr);
    }
    let bad = offline.env("EPHEMERAL_ADMIN_ROOT_VOLUME_GB", "big");
    let run = bad.run(&["launch", "--my-ip", "203.0.113.7"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("$EPHEMERAL_ADMIN_ROOT_VOLUME_GB"), "{}", run.stderr);

    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let small = launch_detached(&user, &proxy, &[]);
    let big = launch_detached(&user, &proxy, &["--root-volume-gb", "100", "--root-volume-type", "gp2"]);
    let state = cloud.state();
    let root = &instance(&state, big["instance_id"].as_str().unwrap())["block_device_mappings"][0];
    assert_eq!(
        (root["volume_type"].as_str(), root["size"].as_i64(), root["encrypted"].as_bool()),
        (Some("gp2"), Some(100), Some(true)),
        "{root}"
    );
    assert_eq!(root["delete_on_termination"].as_bool(), Some(true));
    // 100 GB of gp2 at $0.10/GB-month for 4 h, against 8 GB of gp3 at $0.08.
    let ebs = |out: &Value| out["estimate"]["ebs"].as_f64().unwrap();
    assert!((ebs(&big) - 100.0 * 0.10 / 730.0 * 4.0).abs() < 0.0005, "{}", big["estimate"]);
    assert!(ebs(&small) < 0.005, "{}", small["estimate"]);
    let total = |out: &Value| out["estimate"]["total"].as_f64().unwrap();
    assert!(total(&big) > total(&small) + 0.05);
    user.run(&["terminate", small["session_id"].as_str().unwrap()]).success();
    user.run(&["terminate", big["session_id"].as_str().unwrap()]).success();
    assert_nothing_left(&cloud);
}

/// An administrator makes a role and an instance profile of the same name, as the IAM console does.
fn admin_creates_profile(cloud: &LocalCloud, name: &str) {
    let script = "import boto3, json, sys\n\
        iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                           aws_access_key_id='other', aws_secret_access_key='other')\n\
        trust = {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Principal': {'Service': 'ec2.amazonaws.com'}, 'Action': 'sts:AssumeRole'}]}\n\
        iam.create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument=json.dumps(trust))\n\
        iam.create_instance_profile(InstanceProfileName=sys.argv[2])\n\
        iam.add_role_to_instance_profile(InstanceProfileName=sys.argv[2], RoleName=sys.argv[2])\n";
    let out = Command::new(python()).args(["-c", script, &cloud.url, name]).output().unwrap();
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_instance_profile_of_the_users_replaces_the_box_role_with_the_policy_passing_it() {
    let cloud = LocalCloud::start();
    admin_creates_profile(&cloud, "AdminWorkRole");
    cloud.clear_log();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    user.write_config("instance_profile = \"AdminWorkRole\"\n");
    // The user holds the policy printed with this config: what they would hand their admin.
    let policy = user.run(&["policy"]).success().json();
    let text = policy.to_string();
    assert!(
        text.contains("PassConfiguredInstanceProfileRole") && text.contains("role/AdminWorkRole"),
        "{text}"
    );
    cloud.enforce(&policy);

    let run = user.run(&attached_args(&proxy, &["--detach", "--output", "json"])).success();
    let out = run.json();
    let about: Vec<&str> =
        run.stderr.lines().filter(|l| l.contains("instance profile AdminWorkRole")).collect();
    assert_eq!(about.len(), 1, "one line says so: {}", run.stderr);
    assert!(about[0].contains("which the tool did not make"), "{}", about[0]);
    let state = cloud.state();
    assert_eq!(
        instance(&state, out["instance_id"].as_str().unwrap())["iam_instance_profile"]["name"],
        "AdminWorkRole"
    );
    // A launch writes no IAM at all (the standing roles are `setup roles`'s, made before).
    for create in ["CreateRole", "CreateInstanceProfile", "PutRolePolicy"] {
        assert_eq!(cloud.count(create), 0, "{create} at launch");
    }
    user.run(&["terminate", "last"]).success();

    // A profile that does not exist: exit 2, nothing made.
    user.write_config("instance_profile = \"NoSuchProfile\"\n");
    cloud.enforce(&user.run(&["policy"]).success().json());
    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--detach"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("instance profile \"NoSuchProfile\" does not exist"), "{}", run.stderr);
    for create in ["CreateSecurityGroup", "RunInstances"] {
        assert_eq!(cloud.count(create), 0, "{create} for a refused launch");
    }
    assert_nothing_left(&cloud);

    // Without the setting, the printed policy passes no other role: the launch is denied.
    std::fs::remove_file(user.config_dir().join("config.toml")).unwrap();
    cloud.enforce_narrower(&crate::support::cloud::printed_policy());
    let run = user.run(&attached_args(&proxy, &["--detach", "--instance-profile", "AdminWorkRole"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("iam:GetInstanceProfile"), "{}", run.stderr);
    assert_nothing_left(&cloud);
}
