//! Where the box lives: a subnet of another VPC (its own group made there, extra existing groups
//! attached), an account without a default VPC (the error lists the subnets to pick from), a
//! private subnet (no public IP; reached at the private IP through the box simulator), and the
//! refusals that come before anything is made.

use serde_json::Value;

use crate::lifecycle::login;
use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

/// A VPC CIDR's second octet no other test on this machine is likely to use at the same time
/// (private IPs of boxes without a public IP are added to the shared loopback).
fn fresh_octet() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    100 + (nanos ^ std::process::id()) % 150
}

/// An administrator's VPC with one subnet in us-east-1b (public: with an internet gateway and a
/// 0.0.0.0/0 route to it in its own route table) and one group. Answers
/// {"vpc", "subnet", "group", "cidr"}.
fn admin_makes_vpc(cloud: &LocalCloud, public: bool, map_public_ip: bool) -> Value {
    let octet = fresh_octet();
    let code = format!(
        "vpc = ec2.create_vpc(CidrBlock='10.{octet}.0.0/16')['Vpc']['VpcId']\n\
         sub = ec2.create_subnet(VpcId=vpc, CidrBlock='10.{octet}.1.0/24', AvailabilityZone='us-east-1b')['Subnet']['SubnetId']\n\
         if {map}:\n    ec2.modify_subnet_attribute(SubnetId=sub, MapPublicIpOnLaunch={{'Value': True}})\n\
         if {public}:\n\
         \x20   igw = ec2.create_internet_gateway()['InternetGateway']['InternetGatewayId']\n\
         \x20   ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)\n\
         \x20   rt = ec2.create_route_table(VpcId=vpc)['RouteTable']['RouteTableId']\n\
         \x20   ec2.create_route(RouteTableId=rt, DestinationCidrBlock='0.0.0.0/0', GatewayId=igw)\n\
         \x20   ec2.associate_route_table(RouteTableId=rt, SubnetId=sub)\n\
         sg = ec2.create_security_group(GroupName='db-clients', Description='may reach the database', VpcId=vpc)['GroupId']\n\
         print(json.dumps({{'vpc': vpc, 'subnet': sub, 'group': sg, 'cidr': '10.{octet}.1.0/24'}}))",
        map = if map_public_ip { "True" } else { "False" },
        public = if public { "True" } else { "False" },
    );
    serde_json::from_str(&cloud.admin_ec2(&code)).unwrap()
}

fn instance<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).expect("the instance")
}

fn group<'a>(state: &'a Value, id: &str) -> Option<&'a Value> {
    state["security_groups"].as_array().unwrap().iter().find(|g| g["id"] == id)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn a_subnet_of_another_vpc_gets_the_box_its_group_there_and_the_extra_group() {
    let cloud = LocalCloud::start();
    let net = admin_makes_vpc(&cloud, true, false);
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    cloud.clear_log();
    let out = launch_detached(
        &user,
        &proxy,
        &["--subnet", s(&net, "subnet"), "--security-group", s(&net, "group")],
    );
    let state = cloud.state();
    let box_ = instance(&state, s(&out, "instance_id"));
    assert_eq!(
        (box_["subnet_id"].as_str(), box_["vpc_id"].as_str()),
        (Some(s(&net, "subnet")), Some(s(&net, "vpc")))
    );
    assert_eq!(box_["az"], "us-east-1b", "the subnet's zone, whatever the cheapest zone is");
    assert_eq!(out["availability_zone"], "us-east-1b", "{out}");
    let groups: Vec<&str> =
        box_["security_group_ids"].as_array().unwrap().iter().map(|g| g.as_str().unwrap()).collect();
    assert!(groups.contains(&s(&net, "group")), "the extra group is attached: {groups:?}");
    let own = crate::launch::own_groups(&state);
    assert_eq!(own.len(), 1, "{own:#?}");
    assert_eq!(own[0]["vpc_id"], net["vpc"], "the session's own group lives in the subnet's VPC");
    assert!(groups.contains(&s(&own[0], "id")), "{groups:?}");
    // A public subnet: the box asks for a public IP (the subnet does not map one by itself).
    assert_eq!(box_["launch_request"]["NetworkInterface.1.AssociatePublicIpAddress"], "true", "{box_}");
    assert!(box_["public_ip"].is_string(), "{box_}");
    // Spot prices are asked for the subnet's zone only.
    let lookups: Vec<Value> =
        cloud.calls().into_iter().filter(|c| c["action"] == "DescribeSpotPriceHistory").collect();
    assert!(!lookups.is_empty());
    for call in &lookups {
        assert_eq!(call["params"]["AvailabilityZone"], "us-east-1b", "{call}");
    }

    let run = user.run(&["connect", s(&out, "session_id"), "--", "echo", "reached"]);
    assert_eq!((run.code, run.stdout.trim()), (0, "reached"), "{}", run.stderr);
    user.run(&["terminate", s(&out, "session_id")]).success();
    assert_nothing_left(&cloud);
    assert!(
        group(&cloud.state(), s(&net, "group")).is_some(),
        "the administrator's group is not the tool's to delete"
    );
}

#[test]
fn without_a_default_vpc_the_launch_lists_the_subnets_and_makes_nothing() {
    let cloud = LocalCloud::start();
    let public = admin_makes_vpc(&cloud, true, true);
    let private = admin_makes_vpc(&cloud, false, false);
    // Delete the default VPC as a landing zone would: subnets, internet gateway, then the VPC.
    cloud.admin_ec2(
        "vpc = ec2.describe_vpcs(Filters=[{'Name': 'is-default', 'Values': ['true']}])['Vpcs'][0]['VpcId']\n\
         for s in ec2.describe_subnets(Filters=[{'Name': 'vpc-id', 'Values': [vpc]}])['Subnets']:\n\
         \x20   ec2.delete_subnet(SubnetId=s['SubnetId'])\n\
         for g in ec2.describe_internet_gateways(Filters=[{'Name': 'attachment.vpc-id', 'Values': [vpc]}])['InternetGateways']:\n\
         \x20   ec2.detach_internet_gateway(InternetGatewayId=g['InternetGatewayId'], VpcId=vpc)\n\
         \x20   ec2.delete_internet_gateway(InternetGatewayId=g['InternetGatewayId'])\n\
         ec2.delete_vpc(VpcId=vpc)",
    );
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--detach"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    let says = &run.stderr;
    assert!(says.contains("no default VPC") && says.contains("--subnet"), "{says}");
    let line_of = |subnet: &str| {
        says.lines().find(|l| l.contains(subnet)).unwrap_or_else(|| panic!("{subnet}: {says}"))
    };
    let line = line_of(s(&public, "subnet"));
    for part in [s(&public, "vpc"), "us-east-1b", s(&public, "cidr"), "public", "maps public IPs"] {
        assert!(line.contains(part), "{part} in {line:?}");
    }
    let line = line_of(s(&private, "subnet"));
    for part in [s(&private, "vpc"), "us-east-1b", "private"] {
        assert!(line.contains(part), "{part} in {line:?}");
    }
    for create in ["CreateSecurityGroup", "RunInstances", "CreateRole", "CreateInstanceProfile"] {
        assert_eq!(cloud.count(create), 0, "{create} for a refused launch");
    }
    assert_nothing_left(&cloud);

    // The flag it names works.
    let out = launch_detached(&user, &proxy, &["--subnet", s(&public, "subnet")]);
    assert_eq!(instance(&cloud.state(), s(&out, "instance_id"))["vpc_id"], public["vpc"]);
    user.run(&["terminate", "last"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn a_private_subnet_gets_no_public_ip_and_private_ip_mode_reaches_the_shell() {
    let cloud = LocalCloud::start();
    // The subnet would map public IPs by itself: the launch still asks for none.
    let net = admin_makes_vpc(&cloud, false, true);
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);

    // public-ip (the default) cannot reach a box there: refused before anything is made.
    cloud.clear_log();
    let run =
        user.run(&["launch", "--my-ip", "203.0.113.7", "--user", login(), "--subnet", s(&net, "subnet")]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(s(&net, "subnet")) && run.stderr.contains("is private"), "{}", run.stderr);
    assert!(run.stderr.contains("--connect private-ip"), "{}", run.stderr);
    for create in ["CreateSecurityGroup", "RunInstances"] {
        assert_eq!(cloud.count(create), 0, "{create} for a refused launch");
    }

    // private-ip: the shell is reached at the box's private address (the simulator's "VPN").
    user.write_config(&format!("subnet = \"{}\"\nconnect = \"private-ip\"\n", s(&net, "subnet")));
    let run = user.run(&[
        "launch",
        "--my-ip",
        "203.0.113.7",
        "--user",
        login(),
        "--",
        "sh",
        "-c",
        "echo reached; exit 3",
    ]);
    assert_eq!((run.code, run.stdout.trim()), (3, "reached"), "{}", run.stderr);
    let about = format!("the box goes into subnet {}", s(&net, "subnet"));
    assert!(run.stderr.contains(&about) && run.stderr.contains("private: no public IP"), "{}", run.stderr);
    let state = cloud.state();
    let box_ = state["instances"].as_array().unwrap().last().unwrap();
    assert_eq!(box_["subnet_id"], net["subnet"]);
    assert!(box_["public_ip"].is_null(), "no public IP in a private subnet: {box_}");
    assert_eq!(box_["launch_request"]["NetworkInterface.1.AssociatePublicIpAddress"], "false", "{box_}");
    let private_ip = s(box_, "private_ip");
    assert!(
        private_ip.starts_with(&s(&net, "cidr")[..s(&net, "cidr").len() - 4]),
        "{private_ip} in {}",
        net["cidr"]
    );
    assert_nothing_left(&cloud);

    // proxy-command works there too (no address needed).
    let out = launch_detached(&user, &proxy, &[]);
    assert!(instance(&cloud.state(), s(&out, "instance_id"))["public_ip"].is_null());
    let run = user.run(&["connect", s(&out, "session_id"), "--", "echo", "through-the-proxy"]);
    assert_eq!((run.code, run.stdout.trim()), (0, "through-the-proxy"), "{}", run.stderr);
    user.run(&["terminate", "last"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn a_missing_subnet_or_group_or_a_group_of_another_vpc_is_refused_first() {
    let offline = User::offline();
    for (flag, value) in [("--subnet", "vpc-0123456789abcdef0"), ("--security-group", "db-clients")] {
        let run = offline.run(&["launch", "--my-ip", "203.0.113.7", flag, value]);
        assert_eq!(run.code, 2, "{flag} {value}: {}", run.stderr);
        assert!(run.stderr.contains("expected an id like"), "{}", run.stderr);
    }

    let cloud = LocalCloud::start();
    let net = admin_makes_vpc(&cloud, true, false);
    let default_group = cloud.admin_ec2(
        "vpc = ec2.describe_vpcs(Filters=[{'Name': 'is-default', 'Values': ['true']}])['Vpcs'][0]['VpcId']\n\
         print(ec2.create_security_group(GroupName='other', Description='x', VpcId=vpc)['GroupId'] + ' ' + vpc)",
    );
    let (default_group, default_vpc) = default_group.split_once(' ').unwrap();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    cloud.clear_log();
    let cases: [(&[&str], Vec<&str>); 4] = [
        (
            &["--subnet", "subnet-0123456789abcdef0"],
            vec!["subnet subnet-0123456789abcdef0 does not exist in us-east-1"],
        ),
        (
            &["--security-group", "sg-0123456789abcdef0"],
            vec!["security group sg-0123456789abcdef0 does not exist"],
        ),
        // A group of the default VPC for a box in the other VPC.
        (
            &["--subnet", s(&net, "subnet"), "--security-group", default_group],
            vec![default_group, default_vpc, s(&net, "vpc")],
        ),
        // A group of the other VPC for a box in the default VPC.
        (&["--security-group", s(&net, "group")], vec![s(&net, "group"), s(&net, "vpc"), default_vpc]),
    ];
    for (extra, says) in cases {
        let run = user.run(&attached_args(&proxy, &[&["--detach"][..], extra].concat()));
        assert_eq!(run.code, 2, "{extra:?}: {}", run.stderr);
        for part in says {
            assert!(run.stderr.contains(part), "{extra:?}: {part} in {}", run.stderr);
        }
    }
    for create in ["CreateSecurityGroup", "RunInstances"] {
        assert_eq!(cloud.count(create), 0, "{create} for a refused launch");
    }
    assert_nothing_left(&cloud);
}
