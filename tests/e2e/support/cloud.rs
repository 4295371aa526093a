//! The local cloud for one test: moto + fault/latency proxy (+ box simulator), in a Python
//! process of its own, killed when the test ends (and on its own when our stdin closes).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::{Value, json};

use super::http::request;

pub struct LocalCloud {
    pub url: String,
    /// The port simulated boxes listen on at their own public IP (a loopback address): 22 when
    /// the box simulator could bind it, else a free port the CLI is told about.
    pub box_ssh_port: Option<u16>,
    child: Child,
    _stdin: ChildStdin,
    /// Set by tests that load a narrower policy on purpose; otherwise any denial fails the test
    /// when the cloud is dropped (a denied call the CLI shrugged off is still a missing permission).
    denials_expected: std::cell::Cell<bool>,
}

/// The Python that has moto: `EPHEMERAL_ADMIN_TEST_PYTHON`, else the repo's `.venv`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("EPHEMERAL_ADMIN_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(venv.exists(), "no {}: run scripts/test (it creates the venv with moto)", venv.display());
    venv
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl LocalCloud {
    /// Starts moto and the proxy with the box simulator on a free loopback port.
    pub fn start() -> LocalCloud {
        Self::start_with(&["--box-sim"])
    }

    pub fn start_with(args: &[&str]) -> LocalCloud {
        Self::start_with_env(args, &[])
    }

    /// The box simulator in real-VM mode: every instance boots the real-box test image under
    /// QEMU (`tests/support/realbox/`; the image must be built: scripts/test does it).
    pub fn start_real_vm() -> LocalCloud {
        Self::start_with_env(&["--box-sim"], &[("BOXSIM_REAL_VM", "1")])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> LocalCloud {
        let cloud = Self::start_fresh_account(args, env);
        // An account admin made the tool's standing IAM once, holding exactly the daily and the
        // bootstrap policy; then every test runs as a user holding exactly the policy
        // `ephemeral-admin policy` prints: the local cloud answers anything else with AWS's denial.
        cloud.bootstrap();
        cloud.enforce(&printed_policy());
        // The account's setup is not the test's: its calls start from here.
        cloud.clear_log();
        cloud
    }

    /// An account nobody ran `setup roles` in yet, the daily policy enforced.
    pub fn start_fresh_account(args: &[&str], env: &[(&str, &str)]) -> LocalCloud {
        let script = repo().join("tests/support/localcloud/localcloud.py");
        let mut child = Command::new(python())
            .envs(env.iter().copied())
            .arg(script)
            .args(["--port", "0", "--exit-on-stdin-eof"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start localcloud.py");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read READY line");
        let url = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("url="))
            .unwrap_or_else(|| panic!("localcloud did not start: {line:?}"))
            .to_string();
        let box_ssh_port = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("box_ssh_port="))
            .and_then(|p| p.parse().ok());
        let cloud = LocalCloud {
            url,
            box_ssh_port,
            child,
            _stdin: stdin,
            denials_expected: std::cell::Cell::new(false),
        };
        cloud.enforce(&printed_policy());
        cloud
    }

    /// `setup roles` as an account admin holding the daily and the bootstrap policy (and no
    /// more): the boundary, the scheduler role and the Session Manager role.
    pub fn bootstrap(&self) {
        self.enforce(&admin_policy());
        let run = crate::support::User::new(self).run(&["setup", "roles"]);
        assert_eq!(run.code, 0, "setup roles failed: {}", run.stderr);
        let (_, policy) = request(&self.url, "GET", "/_localcloud/policy", None);
        assert_eq!(policy["denials"], json!([]), "setup roles was denied");
    }

    /// Enforces a narrower `policy` than the printed one: denials are the point of such a test.
    pub fn enforce_narrower(&self, policy: &Value) {
        self.denials_expected.set(true);
        self.enforce(policy);
    }

    /// Enforces `policy` on the CLI's requests (access key `testing`) from now on.
    pub fn enforce(&self, policy: &Value) {
        self.control("PUT", "policy", Some(json!({ "policy": policy })));
    }

    /// The requests the policy denied so far: `{seq, service, api, action, resource}`.
    pub fn denials(&self) -> Vec<Value> {
        self.control("GET", "policy", None)["denials"].as_array().cloned().unwrap_or_default()
    }

    /// Would the enforced policy allow this API call? Maps the request to its IAM checks the
    /// same way enforcement does (`POST /_localcloud/policy/simulate`).
    pub fn simulate(&self, service: &str, action: &str, body: Value) -> Value {
        let mut req = json!({ "service": service, "action": action, "region": "us-east-1" });
        req[if service == "ec2" || service == "iam" || service == "monitoring" {
            "params"
        } else {
            "json"
        }] = body;
        self.control("POST", "policy/simulate", Some(req))
    }

    pub fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = request(&self.url, method, &format!("/_localcloud/{path}"), body.as_ref());
        assert!((200..300).contains(&status), "{method} /_localcloud/{path}: HTTP {status}: {value}");
        value
    }

    /// Replaces the fault rules.
    pub fn rules(&self, rules: Value) {
        self.control("PUT", "rules", Some(json!({ "rules": rules })));
    }

    pub fn config(&self, config: Value) {
        self.control("PUT", "config", Some(config));
    }

    /// Every AWS call the proxy saw, in order.
    pub fn calls(&self) -> Vec<Value> {
        self.control("GET", "log", None)["calls"].as_array().cloned().unwrap_or_default()
    }

    pub fn clear_log(&self) {
        self.control("DELETE", "log", None);
    }

    /// Action names seen, in order.
    pub fn actions(&self) -> Vec<String> {
        self.calls().iter().map(|c| c["action"].as_str().unwrap_or_default().to_string()).collect()
    }

    pub fn count(&self, action: &str) -> usize {
        self.actions().iter().filter(|a| *a == action).count()
    }

    /// Sets a tag as someone else would (boto3 through the same endpoint).
    pub fn retag(&self, resource: &str, key: &str, value: &str) {
        let script = "import boto3, sys\n\
            ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                               aws_access_key_id='other', aws_secret_access_key='other')\n\
            ec2.create_tags(Resources=[sys.argv[2]], Tags=[{'Key': sys.argv[3], 'Value': sys.argv[4]}])\n";
        let ok = Command::new(python())
            .args(["-c", script, &self.url, resource, key, value])
            .status()
            .expect("run boto3")
            .success();
        assert!(ok, "retag {resource}");
    }

    /// Runs `code` with `ec2` bound to a boto3 EC2 client of an administrator (another key, so
    /// the printed policy does not apply), as someone working by hand in the console would.
    /// Returns what the code printed.
    /// (`iam` is bound too.)
    pub fn admin_ec2(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\n\
             kw = dict(endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                       aws_access_key_id='other', aws_secret_access_key='other')\n\
             ec2, iam = boto3.client('ec2', **kw), boto3.client('iam', **kw)\n{code}\n"
        );
        let out = Command::new(python()).args(["-c", &script, &self.url]).output().expect("run boto3");
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs boto3 `code` signed with the CLI's access key (so under the enforced policy), with
    /// `iam` and `ec2` clients and `attempt(fn, **kw)`, which prints the AWS error code or `ok`.
    pub fn as_cli_user(&self, code: &str) -> String {
        self.as_principal("testing", code)
    }

    /// [`as_cli_user`](Self::as_cli_user) signed with `key`, one of the local cloud's enforced
    /// principals (`testing-bob`, `testing-shared-alice`, …), with an `ssm` and a `cw` client too.
    pub fn as_principal(&self, key: &str, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\n\
             from botocore.config import Config\n\
             kw = dict(endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id=sys.argv[2],\n\
                       aws_secret_access_key='testing', config=Config(retries={{'total_max_attempts': 1}}))\n\
             iam, ec2 = boto3.client('iam', **kw), boto3.client('ec2', **kw)\n\
             ssm, cw = boto3.client('ssm', **kw), boto3.client('cloudwatch', **kw)\n\
             def attempt(fn, **args):\n\
             \x20   try:\n\
             \x20       fn(**args)\n\
             \x20       print('ok')\n\
             \x20   except Exception as e:\n\
             \x20       print(getattr(e, 'response', {{}}).get('Error', {{}}).get('Code', repr(e)))\n\
             {code}\n"
        );
        let out = Command::new(python()).args(["-c", &script, &self.url, key]).output().expect("run boto3");
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Everything moto holds in the region, as JSON.
    pub fn state(&self) -> Value {
        self.control("GET", "state?region=us-east-1", None)
    }
}

/// The user policy exactly as the CLI prints it with the default settings.
pub fn printed_policy() -> Value {
    printed(&[])
}

/// What an account admin holds for `setup roles` and `cleanup --purge`: the daily policy and
/// `policy --bootstrap`, side by side.
pub fn admin_policy() -> Value {
    let mut policy = printed_policy();
    let bootstrap = printed(&["--bootstrap"]);
    let statements = policy["Statement"].as_array_mut().unwrap();
    statements.extend(bootstrap["Statement"].as_array().unwrap().iter().cloned());
    policy
}

/// `ephemeral-admin policy ARGS` with the default settings.
pub fn printed(args: &[&str]) -> Value {
    let home = std::env::temp_dir().join(format!("ea-policy-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ephemeral-admin"))
        .arg("policy")
        .args(args)
        .env_clear()
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run ephemeral-admin policy");
    assert!(out.status.success(), "policy failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("policy is JSON")
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        let reachable = std::net::TcpStream::connect(self.url.trim_start_matches("http://")).is_ok();
        if reachable && !std::thread::panicking() && !self.denials_expected.get() {
            let (_, policy) = request(&self.url, "GET", "/_localcloud/policy", None);
            let denials = policy["denials"].as_array().cloned().unwrap_or_default();
            if !denials.is_empty() {
                self.stop();
                panic!("the printed policy denied calls the CLI made: {denials:#?}");
            }
        }
        self.stop();
    }
}

impl LocalCloud {
    fn stop(&mut self) {
        // SIGTERM lets it stop its sshd and watchdog children; then make sure.
        unsafe_kill(self.child.id(), 15);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, signal: i32) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}
