//! Runs the real `ephemeral-admin` binary against the local cloud, in a private HOME.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

use super::cloud::LocalCloud;

/// A user of the CLI: their own HOME, state and config dirs, and credentials for the local cloud.
#[derive(Clone)]
pub struct User {
    pub home: PathBuf,
    endpoint: Option<String>,
    env: Vec<(String, String)>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }

    #[track_caller]
    pub fn success(self) -> Run {
        assert_eq!(self.code, 0, "expected success\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl User {
    pub fn new(cloud: &LocalCloud) -> User {
        let mut user = User::offline();
        user.endpoint = Some(cloud.url.clone());
        // Every launch connects to its box (even `--detach`: the first connection gives the box
        // its own host key), and the box simulator's sshd logs in this machine's users: this one
        // unless a test says `--user`.
        let user = user.env("EPHEMERAL_ADMIN_USER", crate::lifecycle::login());
        // Boxes are dialled at their public IP; only a port other than 22 needs saying.
        match cloud.box_ssh_port {
            Some(port) if port != 22 => user.env("EPHEMERAL_ADMIN_SSH_PORT", &port.to_string()),
            _ => user,
        }
    }

    /// A user with no cloud at all: for inputs that must fail before any AWS call.
    pub fn offline() -> User {
        let home = std::env::temp_dir().join(format!(
            "ea-home-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&home).unwrap();
        User { home, endpoint: None, env: Vec::new() }
    }

    /// The same user (same HOME) with one more environment variable.
    pub fn env(&self, key: &str, value: &str) -> User {
        let mut user = self.clone();
        user.env.push((key.into(), value.into()));
        user
    }

    pub fn config_dir(&self) -> PathBuf {
        self.home.join("config/ephemeral-admin")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.home.join("state/ephemeral-admin")
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        std::fs::create_dir_all(self.config_dir()).unwrap();
        let path = self.config_dir().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ephemeral-admin"));
        cmd.args(args).env_clear();
        for var in ["PATH", "TERM", "LANG"] {
            if let Ok(v) = std::env::var(var) {
                cmd.env(var, v);
            }
        }
        cmd.env("HOME", &self.home)
            .env("XDG_STATE_HOME", self.home.join("state"))
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", self.home.join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.home.join("no-aws-credentials"));
        if let Some(url) = &self.endpoint {
            cmd.env("AWS_ENDPOINT_URL", url);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `program` with exactly the environment the CLI gets (for a shell pipeline or a wrapper
    /// such as `unshare` around it).
    pub fn wrapper(&self, program: &str) -> Command {
        let template = self.command(&[]);
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for (k, v) in template.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let Output { status, stdout, stderr } = self.command(args).output().expect("run ephemeral-admin");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
