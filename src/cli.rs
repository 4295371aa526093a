//! The command line as clap sees it: global flags and the command tree.
//!
//! These types only describe what was typed. They carry no defaults for anything that can also
//! come from the environment or the config file: `settings::resolve` turns them, together with
//! `EPHEMERAL_ADMIN_*` variables and the config file, into validated [`crate::settings::Settings`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A throw-away AWS admin box in one command, gone afterwards.
#[derive(Debug, Parser)]
#[command(name = "ephemeral-admin", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// AWS profile to use (else EPHEMERAL_ADMIN_PROFILE, AWS_PROFILE, config `profile`).
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// AWS region (else EPHEMERAL_ADMIN_REGION, config `region`, AWS_REGION, the profile's).
    #[arg(long, global = true, value_name = "REGION")]
    pub region: Option<String>,
    /// A `[profiles.NAME]` bundle of the config file to apply (else EPHEMERAL_ADMIN_PROFILE_NAME).
    #[arg(long, global = true, value_name = "NAME")]
    pub profile_name: Option<String>,
    /// Config file (else EPHEMERAL_ADMIN_CONFIG, else $XDG_CONFIG_HOME/ephemeral-admin/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// AWS endpoint override, e.g. a local cloud (else AWS_ENDPOINT_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Result format on stdout.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,
    /// No spinners or progress lines (they only show on a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Launch a spot box, open a shell on it, and tear everything down when the shell ends.
    #[command(
        after_help = "Examples:\n  ephemeral-admin launch                         # a shell; everything is removed when it ends\n  ephemeral-admin launch -- sudo apt-get update  # one command; its exit status is ours\n  ephemeral-admin launch --keep --tmux           # work survives a dropped connection\n  ephemeral-admin launch --package jq --setup prep.sh  # runs prep.sh on the box first\n  ephemeral-admin launch -N -L 8443:10.0.1.20:443   # a tunnel; Ctrl-C ends it and the box"
    )]
    Launch(Box<LaunchArgs>),
    /// Open a shell (or run a command) on a running session.
    #[command(
        after_help = "Examples:\n  ephemeral-admin connect k3x9q2ab               # a shell on a running session\n  ephemeral-admin connect k3x9q2ab -- df -h       # one command\n  ephemeral-admin connect i-0123456789abcdef0 --tmux\n  ephemeral-admin connect k3x9q2ab -N -L 5432:db.internal:5432   # a tunnel until Ctrl-C"
    )]
    Connect(ConnectArgs),
    /// Copy files and directories to or from a running session's box (SFTP on the pinned connection).
    #[command(
        after_help = "Either side may be ID:PATH (ID: a session id, name, instance id or `last`); a relative PATH is under\nthe login user's home on the box. Exactly one side is on a box.\n\nExamples:\n  ephemeral-admin cp ./dump.sql last:/tmp/          # up, into an existing directory\n  ephemeral-admin cp -r db-fix:/var/log/nginx ./logs  # a directory, down\n  ephemeral-admin cp a.conf b.conf k3x9q2ab:         # several files into the home directory"
    )]
    Cp(CpArgs),
    /// Move a session's hard deadline later.
    #[command(
        after_help = "Examples:\n  ephemeral-admin extend k3x9q2ab --by 1h\n  ephemeral-admin extend k3x9q2ab --until 2026-11-22T18:00Z\n  ephemeral-admin extend k3x9q2ab --until 2026-11-22T15:00Z --shorten"
    )]
    Extend(ExtendArgs),
    /// List this owner's live sessions in the region.
    #[command(after_help = "Examples:\n  ephemeral-admin list\n  ephemeral-admin list --output json")]
    List,
    /// Show one session in detail.
    #[command(
        after_help = "Examples:\n  ephemeral-admin status k3x9q2ab\n  ephemeral-admin status i-0123456789abcdef0 --output json"
    )]
    Status(SessionIdArg),
    /// Terminate a session and remove everything made for it.
    #[command(
        after_help = "Examples:\n  ephemeral-admin terminate k3x9q2ab    # safe to repeat: it removes whatever is left"
    )]
    Terminate(TerminateArgs),
    /// Remove whatever a crashed or abandoned session left behind.
    #[command(
        after_help = "Examples:\n  ephemeral-admin cleanup --dry-run       # what would go, and why\n  ephemeral-admin cleanup                 # sessions that are over or orphaned\n  ephemeral-admin cleanup --all --purge   # everything, then the shared group and role"
    )]
    Cleanup(CleanupArgs),
    /// Create the standing parts once: the tool's IAM roles (per account, by an admin) or an EC2
    /// Instance Connect Endpoint (per VPC).
    #[command(
        after_help = "Examples:\n  ephemeral-admin setup roles                   # once per account, by an admin (policy --bootstrap)\n  ephemeral-admin setup eice                    # in the default VPC; takes a few minutes\n  ephemeral-admin setup eice --subnet subnet-0ab12cd34ef567890"
    )]
    Setup(SetupArgs),
    /// Check credentials, region, config, network, AMI and permissions.
    #[command(
        after_help = "Examples:\n  ephemeral-admin doctor\n  ephemeral-admin doctor --region eu-west-1 --profile work"
    )]
    Doctor,
    /// Current spot prices per availability zone for the candidate instance types.
    #[command(
        after_help = "Examples:\n  ephemeral-admin prices\n  ephemeral-admin prices --instance-type m5.large --max-runtime 2h"
    )]
    Prices(PricesArgs),
    /// Month-to-date spending and per-session costs against the monthly budget.
    #[command(
        after_help = "Examples:\n  ephemeral-admin cost\n  ephemeral-admin cost --month 2026-10 --output json"
    )]
    Cost(CostArgs),
    /// Create or update the CloudWatch dashboard of session metrics.
    #[command(after_help = "Examples:\n  ephemeral-admin dashboard")]
    Dashboard,
    /// Create or update an AWS Budgets monthly budget with e-mail alerts at 80% and 100%.
    #[command(after_help = "Examples:\n  ephemeral-admin budget --email ops@example.com --limit 2")]
    Budget(BudgetArgs),
    /// Print an OpenSSH `Host` block for a session (for ssh, scp, rsync, editors).
    #[command(
        after_help = "Examples:\n  ephemeral-admin ssh-config k3x9q2ab >> ~/.ssh/config\n  ssh ephemeral-admin-k3x9q2ab\n  ephemeral-admin ssh-config db-fix --install && ssh db-fix   # removed again at teardown"
    )]
    SshConfig(SshConfigArgs),
    /// Carry a byte stream to a session's sshd on stdin and stdout: OpenSSH's ProxyCommand, as
    /// `ssh-config` writes it for an eice session (it then outlives the endpoint's 1 h tunnels).
    #[command(after_help = "Examples:
  ssh -o ProxyCommand='ephemeral-admin proxy k3x9q2ab' admin@k3x9q2ab
  ephemeral-admin ssh-config k3x9q2ab --install   # writes that ProxyCommand for you")]
    Proxy(SessionIdArg),
    /// Print the least-privilege IAM policy a daily user needs to run every command.
    #[command(
        after_help = "Examples:\n  ephemeral-admin policy > policy.json\n  ephemeral-admin policy --bootstrap > bootstrap.json   # an admin's, once, for `setup roles`\n  ephemeral-admin policy --box\n  ephemeral-admin policy --validate"
    )]
    Policy(PolicyArgs),
    /// Write a commented config file with every key and its default.
    #[command(
        after_help = "Examples:\n  ephemeral-admin init\n  ephemeral-admin --config ./team.toml init --force"
    )]
    Init(InitArgs),
    /// Print shell completions.
    #[command(
        after_help = "Examples:\n  ephemeral-admin completions bash > /etc/bash_completion.d/ephemeral-admin\n  ephemeral-admin completions zsh > ~/.zfunc/_ephemeral-admin"
    )]
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(subcommand)]
    pub what: SetupWhat,
}

#[derive(Debug, Subcommand)]
pub enum SetupWhat {
    /// An EC2 Instance Connect Endpoint, for `connect = "eice"`: no public IP, no open port.
    Eice(SetupEiceArgs),
    /// The tool's standing IAM, once per account, by an admin: the permissions boundary, the
    /// scheduler role and the Session Manager box role (needs `policy --bootstrap`).
    Roles,
}

#[derive(Debug, Args)]
pub struct SetupEiceArgs {
    /// The subnet the endpoint goes into (its VPC is the one it serves); default: the default
    /// VPC's subnet in its first zone, or `subnet` from the config.
    #[arg(long, value_name = "SUBNET_ID")]
    pub subnet: Option<String>,
}

/// Flags of `policy`.
#[derive(Debug, Args, Default)]
pub struct PolicyArgs {
    /// Print the Session Manager box role's policy instead (boxes reached by SSH get no role).
    #[arg(long = "box", conflicts_with = "bootstrap")]
    pub box_role: bool,
    /// Print what a team admin adds to the daily policy to end anyone's session
    /// (`terminate --force`, `cleanup --owner any`).
    #[arg(long, conflicts_with_all = ["box_role", "bootstrap"])]
    pub team_admin: bool,
    /// Print what an account admin needs besides the daily policy, once, for `setup roles` and
    /// `cleanup --purge` (every role write bound to the tool's permissions boundary).
    #[arg(long)]
    pub bootstrap: bool,
    /// Check the policy with IAM Access Analyzer (ValidatePolicy) on your account and print its findings.
    #[arg(long)]
    pub validate: bool,
}

/// Flags of `launch`. Every one that is also a config key has the same name in snake_case.
#[derive(Debug, Args, Default)]
pub struct LaunchArgs {
    /// Instance type, repeatable, preferred first [default: t3.small, t3.micro].
    #[arg(long = "instance-type", value_name = "TYPE")]
    pub instance_types: Vec<String>,
    /// AMI alias (ubuntu-24.04, al2023) or an explicit ami- id [default: ubuntu-24.04].
    #[arg(long, value_name = "ALIAS|ami-…")]
    pub ami: Option<String>,
    /// Hard deadline after launch, e.g. 90m [default: 4h, never past max_runtime_cap 12h].
    #[arg(long, value_name = "DUR")]
    pub max_runtime: Option<String>,
    /// How long the box stays up with no SSH connection [default: 2m].
    #[arg(long, value_name = "DUR")]
    pub idle_grace: Option<String>,
    /// Your address as seen by AWS (skips detection): one host, e.g. 203.0.113.7.
    #[arg(long, value_name = "CIDR")]
    pub my_ip: Option<String>,
    /// Also allow SSH from this CIDR (repeatable; warns what it opens). Never implied.
    #[arg(long, value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Login user on the box [default: ubuntu for ubuntu-24.04, ec2-user for al2023 and ami- ids].
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// How to reach the box [default: public-ip].
    #[arg(long, value_enum, value_name = "MODE")]
    pub connect: Option<ConnectMode>,
    /// Run SSH over this command's stdin/stdout (%h host, %p port, %i instance id, %r user).
    #[arg(long, value_name = "CMD")]
    pub proxy_command: Option<String>,
    /// Provision the box, connect once (it gets a host key of its own), print the session, open
    /// no shell, keep the box.
    #[arg(long)]
    pub detach: bool,
    /// Leave the box running after the shell ends (its watchdog still ends it).
    #[arg(long)]
    pub keep: bool,
    /// Attach to (or create) a tmux session on the box.
    #[arg(long)]
    pub tmux: bool,
    /// Record the shell, or the command's output, as an asciicast v2 file (0600).
    #[arg(long, value_name = "FILE", conflicts_with = "detach")]
    pub record: Option<PathBuf>,
    /// Print the time each launch phase took.
    #[arg(long)]
    pub timings: bool,
    /// Launch even if it would exceed the monthly budget.
    #[arg(long)]
    pub over_budget: bool,
    /// A name for the session, usable wherever an id is (unique among your live sessions).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Skip spot: launch on-demand only, for work that must not be interrupted.
    #[arg(long)]
    pub on_demand: bool,
    /// Root volume size in GB, 8 to 16384 [default: 8].
    #[arg(long, value_name = "GB")]
    pub root_volume_gb: Option<u32>,
    /// Root volume type: gp3 or gp2 [default: gp3].
    #[arg(long, value_name = "TYPE")]
    pub root_volume_type: Option<String>,
    /// An existing instance profile for the box, replacing the tool's minimal role.
    #[arg(long, value_name = "NAME")]
    pub instance_profile: Option<String>,
    /// Launch into this subnet (subnet-…); its VPC is the box's [default: the default VPC].
    #[arg(long, value_name = "SUBNET_ID")]
    pub subnet: Option<String>,
    /// Also attach this existing security group (sg-…, in the subnet's VPC; repeatable).
    #[arg(long = "security-group", value_name = "SG_ID")]
    pub security_groups: Vec<String>,
    /// A package to install on the box before the shell or command starts (repeatable).
    #[arg(long = "package", value_name = "NAME")]
    pub packages: Vec<String>,
    /// A script file to run on the box (as root, through cloud-init) before the shell or command.
    #[arg(long, value_name = "FILE", conflicts_with = "setup_script")]
    pub setup: Option<PathBuf>,
    /// The same, given inline: `--setup-script 'echo hi > /etc/motd'`.
    #[arg(long, value_name = "SCRIPT")]
    pub setup_script: Option<String>,
    #[command(flatten)]
    pub forward: ForwardArgs,
    /// Copy LOCAL (a file or directory) to the box before the shell or command starts
    /// (repeatable; REMOTE defaults to the same name in the login user's home).
    #[arg(long, value_name = "LOCAL[:REMOTE]")]
    pub upload: Vec<String>,
    /// Run this command on the box instead of a shell (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Port and agent forwarding on `launch` and `connect`, spelled as in OpenSSH. Everything
/// forwarded lives as long as this client's connection.
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Forwarding (while connected)")]
pub struct ForwardArgs {
    /// Listen here (127.0.0.1 unless ADDR is given), connect to HOST:PORT from the box (repeatable).
    #[arg(short = 'L', value_name = "[ADDR:]PORT:HOST:PORT")]
    pub local: Vec<String>,
    /// Listen on the box (its loopback unless ADDR; PORT 0: the box picks), connect to HOST:PORT from here (repeatable).
    #[arg(short = 'R', value_name = "[ADDR:]PORT:HOST:PORT")]
    pub remote: Vec<String>,
    /// A SOCKS5 proxy here (127.0.0.1 unless ADDR) whose connections go out from the box (repeatable).
    #[arg(short = 'D', value_name = "[ADDR:]PORT")]
    pub dynamic: Vec<String>,
    /// Forward your ssh-agent (SSH_AUTH_SOCK): root on the box can use it while you are connected.
    #[arg(short = 'A', long)]
    pub forward_agent: bool,
    /// No shell or command: only forward, until Ctrl-C (or the connection ends).
    #[arg(short = 'N')]
    pub no_command: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectMode {
    PublicIp,
    PrivateIp,
    ProxyCommand,
    Ssm,
    /// Through an EC2 Instance Connect Endpoint: no public IP, no port open to the caller.
    Eice,
}

impl ConnectMode {
    pub const ALL: [ConnectMode; 5] = [
        ConnectMode::PublicIp,
        ConnectMode::PrivateIp,
        ConnectMode::ProxyCommand,
        ConnectMode::Ssm,
        ConnectMode::Eice,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectMode::PublicIp => "public-ip",
            ConnectMode::PrivateIp => "private-ip",
            ConnectMode::ProxyCommand => "proxy-command",
            ConnectMode::Ssm => "ssm",
            ConnectMode::Eice => "eice",
        }
    }

    pub fn from_name(name: &str) -> Option<ConnectMode> {
        ConnectMode::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

#[derive(Debug, Args)]
pub struct SessionIdArg {
    /// Session id (as printed by `launch` and `list`), its name, its instance id (i-…), or `last`.
    #[arg(value_name = "ID")]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    #[command(flatten)]
    pub session: SessionIdArg,
    /// End it even if another person launched it (AWS allows that only with a team admin's
    /// policy: `ephemeral-admin policy --team-admin`).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub session: SessionIdArg,
    /// Write the block into ~/.ssh/ephemeral-admin/config (included from ~/.ssh/config) instead
    /// of printing it; teardown and cleanup remove it again.
    #[arg(long)]
    pub install: bool,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub session: SessionIdArg,
    /// How to reach the box.
    #[arg(long, value_enum, value_name = "MODE")]
    pub connect: Option<ConnectMode>,
    /// Run SSH over this command's stdin/stdout (%h host, %p port, %i instance id, %r user).
    #[arg(long, value_name = "CMD")]
    pub proxy_command: Option<String>,
    /// Attach to (or create) a tmux session on the box.
    #[arg(long)]
    pub tmux: bool,
    /// Record the shell, or the command's output, as an asciicast v2 file (0600).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub forward: ForwardArgs,
    /// Run this command on the box instead of a shell (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: local paths, or ID:PATH on one box.
    #[arg(value_name = "SRC", required = true)]
    pub sources: Vec<String>,
    /// Where to: a local path, or ID:PATH (an existing directory takes the sources by name).
    #[arg(value_name = "DST")]
    pub dest: String,
    /// Copy directories with everything in them.
    #[arg(short = 'r', long, visible_short_alias = 'R')]
    pub recursive: bool,
    /// Keep the source's modes (sticky bit included, umask not applied), as `scp -p`; setuid
    /// and setgid are never copied. Without it, new files get the source's mode less the umask.
    #[arg(short = 'p', long)]
    pub preserve: bool,
    /// How to reach the box.
    #[arg(long, value_enum, value_name = "MODE")]
    pub connect: Option<ConnectMode>,
    /// Run SSH over this command's stdin/stdout (%h host, %p port, %i instance id, %r user).
    #[arg(long, value_name = "CMD")]
    pub proxy_command: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["by", "until"])))]
pub struct ExtendArgs {
    #[command(flatten)]
    pub session: SessionIdArg,
    /// Add this much time to the current deadline, e.g. 1h.
    #[arg(long, value_name = "DUR")]
    pub by: Option<String>,
    /// New deadline, RFC 3339 (2026-11-22T18:00:00Z); later than the current one unless --shorten.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Allow --until to move the deadline earlier.
    #[arg(long, requires = "until")]
    pub shorten: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Only these sessions: ids, names, instance ids or `last` (default: every session that is over or orphaned).
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// List what would be removed, and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove live and kept sessions of this owner.
    #[arg(long)]
    pub all: bool,
    /// Scan every enabled region in parallel.
    #[arg(long)]
    pub all_regions: bool,
    /// Whose sessions: `me` (default) or `any` (administrators only).
    #[arg(long, value_name = "me|any")]
    pub owner: Option<String>,
    /// Also delete the security group and the IAM role/profile once nothing uses them.
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Args)]
pub struct PricesArgs {
    /// Instance types to price (default: the configured candidates).
    #[arg(long = "instance-type", value_name = "TYPE")]
    pub instance_types: Vec<String>,
    /// Session length the estimate assumes (default: max_runtime).
    #[arg(long, value_name = "DUR")]
    pub max_runtime: Option<String>,
}

#[derive(Debug, Args)]
pub struct CostArgs {
    /// The month to report, YYYY-MM (default: this month, UTC).
    #[arg(long, value_name = "YYYY-MM")]
    pub month: Option<String>,
}

#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Where AWS sends the alerts.
    #[arg(long, value_name = "ADDR")]
    pub email: String,
    /// Monthly limit in USD (default: monthly_budget).
    #[arg(long, value_name = "USD")]
    pub limit: Option<f64>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Overwrite an existing config file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl Command {
    /// The launch-time flags this command carries, if any, for settings resolution.
    pub fn launch_args(&self) -> Option<&LaunchArgs> {
        match self {
            Command::Launch(args) => Some(args.as_ref()),
            _ => None,
        }
    }

    /// The forwarding flags of `launch` and `connect`.
    pub fn forward_args(&self) -> Option<&ForwardArgs> {
        match self {
            Command::Launch(args) => Some(&args.forward),
            Command::Connect(args) => Some(&args.forward),
            _ => None,
        }
    }
}
