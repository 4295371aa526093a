//! The foundation: bad input never reaches AWS, doctor/prices/policy/completions work against
//! moto, and the proxy's fault rules and delay do what the other tests rely on.

use serde_json::{Value, json};

use crate::support::{LocalCloud, User};

/// Arguments, environment, and the words the one-line error must contain.
type BadInput = (&'static [&'static str], &'static [(&'static str, &'static str)], &'static str);

/// Bad inputs, each with the words its one-line error must contain. All exit 2 with no AWS call.
#[test]
fn bad_input_exits_2_before_any_aws_call() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    let cases: &[BadInput] = &[
        (
            &["launch", "--max-runtime", "2"],
            &[],
            "invalid max_runtime \"2\" (from --max-runtime): expected a duration like 2m",
        ),
        (&["launch", "--idle-grace", "soon"], &[], "invalid idle_grace \"soon\""),
        (&["launch", "--my-ip", "300.1.2.3"], &[], "invalid my_ip \"300.1.2.3\""),
        (&["launch", "--allow-cidr", "10.0.0.0/33"], &[], "invalid allow_cidr"),
        (&["launch", "--instance-type", "T3.SMALL"], &[], "expected an EC2 type like t3.small"),
        (&["launch", "--ami", "ami-xyz"], &[], "invalid ami \"ami-xyz\""),
        (&["launch", "--connect", "proxy-command"], &[], "needs a command"),
        (&["launch", "--max-runtime", "13h"], &[], "longer than max_runtime_cap"),
        (
            &["launch"],
            &[("EPHEMERAL_ADMIN_SPOT_PRICE_RATIO", "1.5")],
            "expected a fraction of the on-demand price in (0, 1]",
        ),
        (
            &["launch"],
            &[("EPHEMERAL_ADMIN_MAX_RUNTIME", "2")],
            "(from $EPHEMERAL_ADMIN_MAX_RUNTIME): expected a duration like 2m",
        ),
        (&["prices"], &[("EPHEMERAL_ADMIN_MONTHLY_BUDGET", "lots")], "invalid monthly_budget"),
        (&["doctor", "--region", "mars-1"], &[], "invalid region \"mars-1\""),
        (&["doctor", "--endpoint-url", "ftp://example"], &[], "invalid endpoint URL"),
        (&["list"], &[("EPHEMERAL_ADMIN_IDLE_GRACE", "0s")], "longer than zero"),
        (
            &["cleanup"],
            &[("EPHEMERAL_ADMIN_CONFIG", "/nonexistent/config.toml")],
            "cannot read config file /nonexistent/config.toml",
        ),
    ];
    for (args, env, expected) in cases {
        let mut cmd_user = User::new(&cloud);
        for (k, v) in *env {
            cmd_user = cmd_user.env(k, v);
        }
        let cmd_user = cmd_user;
        let run = cmd_user.run(args);
        assert_eq!(run.code, 2, "{args:?} {env:?}: expected exit 2\nstderr: {}", run.stderr);
        let first = run.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(expected),
            "{args:?}: {first:?} lacks {expected:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: one line only:\n{}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: nothing on stdout");
    }

    // Config file problems name the key, the file and the line.
    let path = user.write_config("region = \"us-east-1\"\nmax_runtim = \"2h\"\n");
    let run = user.run(&["list"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains(&format!("{}:2", path.display())) && run.stderr.contains("max_runtim"),
        "{}",
        run.stderr
    );
    user.write_config("[tags]\n\"bad key\" = \"x\"\n");
    let run = user.run(&["launch", "--detach"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("invalid tag key \"bad key\""), "{}", run.stderr);
    user.write_config("idle_grace = \"2\"\n");
    let run = user.run(&["extend", "abcdefgh", "--by", "1h"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains(&format!("{}:1", path.display())), "{}", run.stderr);

    // Clap's own usage errors are exit 2 too.
    assert_eq!(user.run(&["launch", "--no-such-flag"]).code, 2);
    assert_eq!(user.run(&["extend", "abcdefgh"]).code, 2, "extend needs --by or --until");

    assert_eq!(cloud.calls(), Vec::<Value>::new(), "bad input must never reach AWS");
}

#[test]
fn doctor_passes_against_the_local_cloud_and_names_the_caller() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    let run = user.run(&["doctor", "--output", "json"]).success();
    let report = run.json();
    assert_eq!(report["ok"], true, "{report:#}");
    let checks: Vec<&str> =
        report["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        checks,
        [
            "credentials",
            "region",
            "config",
            "network",
            "ami",
            "permission:RunInstances",
            "permission:TerminateInstances",
            "permission:AuthorizeSecurityGroupIngress",
            "eice",
            "roles"
        ]
    );
    assert_eq!(report["checks"][0]["detail"], "arn:aws:sts::123456789012:user/moto");
    assert!(report["checks"][4]["detail"].as_str().unwrap().contains("ubuntu-24.04 → ami-"));
    // Checks run in parallel and nothing was created. RunInstances is probed with the tool's
    // tags, as the policy requires; terminate and authorize are allowed only on the tool's own
    // resources, and a fresh account has none to try them on.
    let actions = cloud.actions();
    let dry: Vec<Value> = cloud.calls().into_iter().filter(|c| c["action"] == "RunInstances").collect();
    assert_eq!(dry.len(), 1, "RunInstances probed once: {actions:?}");
    assert_eq!(dry[0]["params"]["DryRun"], "true", "only as a dry run");
    assert_eq!(dry[0]["params"]["TagSpecification.1.Tag.1.Value"], "EphemeralContainer");
    for write in ["TerminateInstances", "AuthorizeSecurityGroupIngress"] {
        assert_eq!(cloud.count(write), 0, "{write} not probed on made-up ids: {actions:?}");
        let check =
            report["checks"].as_array().unwrap().iter().find(|c| c["name"] == format!("permission:{write}"));
        assert!(check.unwrap()["detail"].as_str().unwrap().starts_with("not probed"), "{report:#}");
    }
    assert!(cloud.state()["instances"].as_array().unwrap().is_empty());
    assert!(cloud.denials().is_empty(), "{:#?}", cloud.denials());

    // Text output is a table with a status per check.
    let text = user.run(&["doctor"]).success().stdout;
    assert!(text.starts_with("CHECK"), "{text}");
    assert_eq!(text.matches("  OK  ").count(), 10, "{text}");
}

#[test]
fn doctor_fails_with_a_fix_when_a_permission_is_denied_or_the_ami_is_missing() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    cloud.rules(json!([{ "action": "RunInstances", "error": "UnauthorizedOperation", "message": "You are not authorized" }]));
    let run = user.env("EPHEMERAL_ADMIN_AMI", "ami-0123456789abcdef0").run(&["doctor", "--output", "json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let report = run.json();
    let check =
        |name: &str| report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    assert_eq!(check("permission:RunInstances")["ok"], false);
    assert!(check("permission:RunInstances")["fix"].as_str().unwrap().contains("ephemeral-admin policy"));
    assert_eq!(check("ami")["ok"], false);
    assert!(check("ami")["detail"].as_str().unwrap().contains("ami-0123456789abcdef0 does not exist"));
    assert_eq!(check("credentials")["ok"], true);
}

#[test]
fn prices_lists_every_zone_cheapest_first_with_a_session_estimate() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    cloud.config(json!({ "spot_prices": { "us-east-1": { "us-east-1b": { "t3.small": 0.0051 } } } }));
    let report = user.run(&["prices", "--output", "json", "--instance-type", "t3.small"]).success().json();
    let rows = report["prices"].as_array().unwrap();
    assert!(rows.len() >= 3, "a price per zone: {report:#}");
    let prices: Vec<f64> = rows.iter().map(|r| r["spot_price"].as_f64().unwrap()).collect();
    assert!(prices.windows(2).all(|w| w[0] <= w[1]), "cheapest first: {prices:?}");
    assert_eq!(rows[0]["availability_zone"], "us-east-1b");
    assert_eq!(rows[0]["spot_price"], 0.0051);
    assert_eq!(rows[0]["on_demand_price"], 0.0208);
    let estimate = &rows[0]["session_estimate"];
    let expected_compute = 0.0051 * 4.0;
    assert!((estimate["compute"].as_f64().unwrap() - expected_compute).abs() < 1e-9);
    assert!((estimate["ipv4"].as_f64().unwrap() - 0.02).abs() < 1e-9);
    let zones: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["availability_zone"].as_str().unwrap()).collect();
    assert_eq!(zones.len(), rows.len(), "one row per zone");

    // Default candidates are the configured types; text output is a table.
    let text = user.run(&["prices", "--max-runtime", "1h"]).success().stdout;
    assert!(text.lines().next().unwrap().contains("1h SESSION"), "{text}");
    assert!(text.contains("t3.micro") && text.contains("t3.small"), "{text}");
}

#[test]
fn proxy_faults_and_delay_behave_as_the_tests_expect() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);

    // Throttling twice: the SDK's standard retry rides it out; the log shows each attempt.
    cloud.rules(
        json!([{ "action": "DescribeSpotPriceHistory", "error": "RequestLimitExceeded", "times": 2 }]),
    );
    user.run(&["prices"]).success();
    let calls: Vec<Value> =
        cloud.calls().into_iter().filter(|c| c["action"] == "DescribeSpotPriceHistory").collect();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert_eq!(calls[0]["injected"], "error:RequestLimitExceeded");
    assert_eq!(calls[0]["status"], 503);
    assert_eq!(calls[2]["injected"], Value::Null);

    // A dropped connection on a read is retried too.
    cloud.clear_log();
    cloud.rules(json!([{ "action": "DescribeSpotPriceHistory", "drop": true, "times": 1 }]));
    user.run(&["prices"]).success();
    assert_eq!(cloud.count("DescribeSpotPriceHistory"), 2);

    // A persistent server error ends in one actionable line naming the code; exit 1.
    cloud.rules(json!([{ "action": "DescribeSpotPriceHistory", "error": "InternalError", "status": 500 }]));
    let run = user.run(&["prices"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.starts_with("error: reading spot prices: InternalError"), "{}", run.stderr);

    // Rules can match a request field, and the added delay shows in the call log.
    cloud.rules(json!([{ "action": "DescribeSpotPriceHistory", "match": { "InstanceType.1": "t3.nano" }, "error": "InternalError" }]));
    cloud.config(json!({ "delay_ms": 150 }));
    cloud.clear_log();
    user.run(&["prices"]).success();
    let call = cloud.calls().into_iter().find(|c| c["action"] == "DescribeSpotPriceHistory").unwrap();
    let took = call["t_end"].as_f64().unwrap() - call["t_start"].as_f64().unwrap();
    assert!(took >= 0.15, "delay applied: {took}");
    assert_eq!(call["injected"], Value::Null, "the rule matched only t3.nano");
}

#[test]
fn policy_is_valid_json_and_covers_every_action_the_tool_calls() {
    let cloud = LocalCloud::start_with(&[]);
    let user = User::new(&cloud);
    let policy: Value = serde_json::from_str(&user.run(&["policy"]).success().stdout).unwrap();
    assert_eq!(policy["Version"], "2012-10-17");
    user.run(&["doctor"]).success();
    user.run(&["prices"]).success();
    assert_policy_covers(&cloud, &user);
}

/// The local cloud enforced exactly the policy `ephemeral-admin policy` prints for this user, and
/// denied nothing: every call the tool made is allowed by it, with IAM's rules (resources, tag
/// conditions, the tag action a create-with-tags call needs, PassRole).
pub fn assert_policy_covers(cloud: &LocalCloud, user: &User) {
    let policy: Value = serde_json::from_str(&user.run(&["policy"]).success().stdout).unwrap();
    let enforced = cloud.control("GET", "policy", None);
    assert_eq!(enforced["policy"], policy, "the local cloud enforces the printed policy");
    assert!(!cloud.calls().is_empty(), "the tool made AWS calls");
    let denials = cloud.denials();
    assert!(denials.is_empty(), "`ephemeral-admin policy` lacks permissions the tool used: {denials:#?}");
}

#[test]
fn completions_for_every_shell() {
    let user = User::offline();
    let bash = user.run(&["completions", "bash"]).success().stdout;
    assert!(bash.contains("complete -F _ephemeral__admin") && bash.contains("launch"), "{bash}");
    let zsh = user.run(&["completions", "zsh"]).success().stdout;
    assert!(zsh.starts_with("#compdef ephemeral-admin"));
    assert_eq!(user.run(&["cost", "--month", "November"]).code, 2);
}

#[test]
fn init_writes_the_documented_defaults_which_resolve_cleanly() {
    let user = User::offline();
    let run = user.run(&["init"]).success();
    let path = user.config_dir().join("config.toml");
    assert!(run.stdout.contains(path.to_str().unwrap()));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), include_str!("../../config.example.toml"));
    assert_eq!(user.run(&["init"]).code, 2, "never overwrites without --force (bad input: exit 2)");
    user.run(&["init", "--force"]).success();
    // The example parses and validates: `policy` resolves settings before printing.
    user.run(&["policy"]).success();
}

#[test]
fn cloudwatch_sdk_stays_pinned_to_the_last_awsquery_release() {
    // moto serves CloudWatch over awsQuery only; aws-sdk-cloudwatch >= 1.100 speaks rpc-v2-cbor.
    let lock = include_str!("../../Cargo.lock");
    let entry = lock.split("[[package]]").find(|p| p.contains("name = \"aws-sdk-cloudwatch\"")).unwrap();
    assert!(entry.contains("version = \"1.99.0\""), "aws-sdk-cloudwatch must stay =1.99.0: {entry}");
}
