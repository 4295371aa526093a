//! The one place settings are resolved: flags > `EPHEMERAL_ADMIN_*` env > config file > defaults.
//!
//! [`resolve`] reads the config file, merges every source, and validates everything before any
//! command runs, so bad input never reaches AWS. Each error names the value, where it came from
//! (flag, variable, or file and line) and what would be accepted, and maps to exit code 2.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::cli::{Cli, Command, ConnectMode, OutputFormat};
use crate::error::UsageError;

/// Everything a command needs to know, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file that was read, if any.
    pub config_path: Option<PathBuf>,
    pub aws: AwsSettings,
    pub output: OutputFormat,
    /// 0 = errors only (-q), 1 = warnings and progress (default), 2 = info (-v), 3 = debug, 4 = trace.
    pub verbosity: u8,
    pub progress: bool,
    pub instance_types: Vec<String>,
    pub ami: AmiChoice,
    pub user: String,
    pub max_runtime: Duration,
    pub max_runtime_cap: Duration,
    pub idle_grace: Duration,
    /// The idle grace of a kept session (`--keep`, `--detach`, `--tmux`): long enough that work
    /// survives a dropped connection; the deadline still applies.
    pub kept_idle_grace: Duration,
    pub boot_grace: Duration,
    pub watchdog_interval: Duration,
    pub connect_timeout: Duration,
    /// How long `launch` waits for the box's setup (packages and script) before giving up.
    pub setup_timeout: Duration,
    /// The TCP port dialled on the box (`connect = public-ip|private-ip`, and `%p` in a proxy
    /// command). The box's sshd and the ingress rule use 22; another value only makes sense for
    /// a port-mapped route, such as the local cloud's simulated boxes when port 22 is taken.
    pub ssh_port: u16,
    pub spot_price_ratio: f64,
    pub on_demand_fallback: bool,
    pub security_group_name: String,
    pub iam_role_name: String,
    /// Who owns the sessions this user launches (the owner tag), instead of the one derived from
    /// the caller's identity (see `aws::identity::owner_of`).
    pub owner: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub monthly_budget: f64,
    pub connect: ConnectMode,
    pub proxy_command: Option<String>,
    pub my_ip: Option<IpNet>,
    pub allow_cidrs: Vec<IpNet>,
    pub tmux: bool,
    /// `launch --name`: validated by [`crate::session::validate_name`]; a flag only (a name is
    /// per session, so a config default would collide with itself).
    pub name: Option<String>,
    /// Skip spot entirely: only the fallback chain's on-demand candidates.
    pub on_demand: bool,
    pub root_volume: RootVolume,
    /// An existing instance profile that replaces the tool's minimal box role.
    pub instance_profile: Option<String>,
    /// The subnet to launch into (its VPC follows); None = the default VPC.
    pub subnet: Option<String>,
    /// Existing groups attached to the box besides its own (e.g. one a private database admits).
    pub security_groups: Vec<String>,
    /// USD per hour by region and instance type, overriding the shipped table.
    pub on_demand_prices: BTreeMap<String, BTreeMap<String, f64>>,
    /// Packages installed on the box before the shell or command starts.
    pub packages: Vec<String>,
    /// The script run on the box (as root, through cloud-init) before the shell or command.
    pub setup: Option<SetupScript>,
    /// The `[profiles.NAME]` bundle applied, if any.
    pub profile_name: Option<String>,
    /// `$XDG_STATE_HOME/ephemeral-admin`: session records, keys, ledger.
    pub state_dir: PathBuf,
    /// `$HOME/.ssh`, where `ssh-config --install` writes (None without HOME).
    pub ssh_dir: Option<PathBuf>,
    /// Port forwarding of `launch` and `connect` (see [`resolve_forwarding`]).
    pub forwarding: Forwarding,
}

/// `-L`, `-R`, `-D`, `-N` (flags only: they belong to one connection) and `-A` / `forward_agent`.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    pub forwards: crate::ssh::forward::Forwards,
    /// `-N`: no shell or command, only the forwards.
    pub no_command: bool,
    /// Forward the agent (`-A` or `forward_agent = true`).
    pub agent: bool,
    /// `$SSH_AUTH_SOCK`, the agent to forward.
    pub agent_socket: Option<PathBuf>,
}

/// What the AWS SDK needs beyond its own default chain.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    /// Dial this base URL for EICE tunnels (`ws://127.0.0.1:PORT` for the local cloud) instead
    /// of `wss://<the endpoint's DnsName>`; the DnsName is still the signed `Host`.
    pub eice_endpoint_url: Option<String>,
}

/// The image to boot: a well-known alias resolved through SSM public parameters, or an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmiChoice {
    Alias(AmiAlias),
    Id(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmiAlias {
    Ubuntu2404,
    Al2023,
}

impl AmiAlias {
    pub const ALL: [(&'static str, AmiAlias); 2] =
        [("ubuntu-24.04", AmiAlias::Ubuntu2404), ("al2023", AmiAlias::Al2023)];

    pub fn name(self) -> &'static str {
        match self {
            AmiAlias::Ubuntu2404 => "ubuntu-24.04",
            AmiAlias::Al2023 => "al2023",
        }
    }

    /// The image's default login user.
    pub fn default_user(self) -> &'static str {
        match self {
            AmiAlias::Ubuntu2404 => "ubuntu",
            AmiAlias::Al2023 => "ec2-user",
        }
    }
}

impl fmt::Display for AmiChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmiChoice::Alias(alias) => f.write_str(alias.name()),
            AmiChoice::Id(id) => f.write_str(id),
        }
    }
}

/// The box's root volume: size and EBS type (always encrypted, deleted with the instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootVolume {
    pub gb: u32,
    pub kind: VolumeKind,
}

impl Default for RootVolume {
    fn default() -> RootVolume {
        RootVolume { gb: 8, kind: VolumeKind::Gp3 }
    }
}

/// The EBS volume types a root volume may have. io1/io2 need provisioned IOPS (and cost per
/// IOPS), which the tool does not set, so they are refused with that reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    Gp3,
    Gp2,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Gp3 => "gp3",
            VolumeKind::Gp2 => "gp2",
        }
    }

    pub fn from_name(name: &str) -> Option<VolumeKind> {
        [VolumeKind::Gp3, VolumeKind::Gp2].into_iter().find(|k| k.as_str() == name)
    }
}

/// A setup script's text and what to call it in messages (its file, or "the inline script").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupScript {
    pub text: String,
    pub origin: String,
}

/// Root volume sizes EBS accepts for gp2 and gp3.
pub const ROOT_VOLUME_GB_RANGE: std::ops::RangeInclusive<u32> = 8..=16384;

/// CPU architecture, derived from the instance types (Graviton families end in `g`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    pub fn of_instance_type(instance_type: &str) -> Arch {
        let family = instance_type.split('.').next().unwrap_or_default();
        let family = family.split('-').next().unwrap_or_default();
        // The letters after the generation digit are attributes; `g` means Graviton (t4g, m7gd).
        let attributes = family.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        let attributes = attributes.trim_start_matches(|c: char| c.is_ascii_digit());
        if attributes.contains('g') { Arch::Arm64 } else { Arch::X86_64 }
    }
}

impl Settings {
    pub fn arch(&self) -> Arch {
        Arch::of_instance_type(&self.instance_types[0])
    }

    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("ledger.jsonl")
    }
}

/// Every key the config file accepts. Unknown keys are an error naming the key and the line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    region: Option<String>,
    profile: Option<String>,
    endpoint_url: Option<String>,
    eice_endpoint_url: Option<String>,
    instance_types: Option<Vec<String>>,
    ami: Option<String>,
    user: Option<String>,
    max_runtime: Option<String>,
    max_runtime_cap: Option<String>,
    idle_grace: Option<String>,
    kept_idle_grace: Option<String>,
    boot_grace: Option<String>,
    watchdog_interval: Option<String>,
    connect_timeout: Option<String>,
    setup_timeout: Option<String>,
    ssh_port: Option<u16>,
    spot_price_ratio: Option<Number>,
    on_demand_fallback: Option<bool>,
    security_group_name: Option<String>,
    iam_role_name: Option<String>,
    owner: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    monthly_budget: Option<Number>,
    connect: Option<String>,
    proxy_command: Option<String>,
    my_ip: Option<String>,
    allow_cidr: Option<Vec<String>>,
    tmux: Option<bool>,
    on_demand: Option<bool>,
    root_volume_gb: Option<u32>,
    root_volume_type: Option<String>,
    instance_profile: Option<String>,
    subnet: Option<String>,
    security_groups: Option<Vec<String>>,
    output: Option<String>,
    on_demand_prices: Option<BTreeMap<String, BTreeMap<String, Number>>>,
    packages: Option<Vec<String>>,
    setup: Option<String>,
    setup_script: Option<String>,
    /// Named bundles of the keys above, applied over the top level with `--profile-name`.
    profiles: Option<BTreeMap<String, toml::Table>>,
    forward_agent: Option<bool>,
}

/// Keys that are two spellings of one setting: a profile setting one replaces the other.
const ALTERNATIVE_KEYS: [&[&str]; 1] = [&["setup", "setup_script"]];

/// TOML distinguishes `2` from `2.0`; a budget or a ratio accepts either.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn value(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Source {
    Flag(&'static str),
    Env(String),
    File { path: PathBuf, line: Option<usize> },
}

impl Source {
    /// Precedence: a flag beats a variable beats the file.
    fn rank(&self) -> u8 {
        match self {
            Source::Flag(_) => 3,
            Source::Env(_) => 2,
            Source::File { .. } => 1,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "from {flag}"),
            Source::Env(var) => write!(f, "from ${var}"),
            Source::File { path, line: Some(line) } => write!(f, "in {}:{line}", path.display()),
            Source::File { path, line: None } => write!(f, "in {}", path.display()),
        }
    }
}

/// Environment lookup, injectable so tests can resolve settings without touching the process.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// The `EPHEMERAL_ADMIN_*` name of a config key.
pub fn env_name(key: &str) -> String {
    format!("EPHEMERAL_ADMIN_{}", key.to_ascii_uppercase())
}

/// Resolves and validates every setting for this invocation. No AWS call happens before this.
pub fn resolve(cli: &Cli, env: &dyn Env) -> Result<Settings, UsageError> {
    let (config_path, file_text) = locate_config(cli, env)?;
    let profile_name = match &cli.global.profile_name {
        Some(name) => Some((name.clone(), Source::Flag("--profile-name"))),
        None => env
            .var("EPHEMERAL_ADMIN_PROFILE_NAME")
            .map(|v| (v, Source::Env("EPHEMERAL_ADMIN_PROFILE_NAME".into()))),
    };
    let mut file = match (&config_path, &file_text) {
        (Some(path), Some(text)) => read_config(path, text, profile_name.as_ref())?,
        _ if profile_name.is_some() => return Err(no_such_profile(profile_name.as_ref(), &BTreeMap::new())),
        _ => FileConfig::default(),
    };
    let profile_keys = profile_name.as_ref().and_then(|(name, _)| {
        Some((name.clone(), file.profiles.as_ref()?.get(name)?.keys().cloned().collect()))
    });
    let r = Resolver {
        env,
        path: config_path.clone(),
        text: file_text.unwrap_or_default(),
        profile: profile_keys,
    };
    let launch = cli.command.launch_args();
    let g = &cli.global;

    let aws = aws_settings(&r, g, &mut file)?;
    let output = match r.string("output", None, "--output", file.output.take())? {
        _ if g.output.is_some() => g.output.unwrap(),
        Some((value, source)) => parse_output(&value, &source)?,
        None => OutputFormat::Text,
    };
    let instance_types = r
        .list(
            "instance_types",
            instance_type_flags(&cli.command),
            "--instance-type",
            file.instance_types.take(),
        )?
        .unwrap_or_else(|| (vec!["t3.small".into(), "t3.micro".into()], None));
    let (instance_types, types_source) = instance_types;
    validate_instance_types(&instance_types, types_source.as_ref())?;
    let (ami, user) = image(&r, launch, &mut file)?;
    let times = durations(&r, cli, launch, &mut file)?;
    let ssh_port = ssh_port(&r, &mut file)?;
    let money = spending(&r, &mut file)?;
    let on_demand_fallback = r.boolean("on_demand_fallback", file.on_demand_fallback)?.unwrap_or(true);
    let tmux = launch.is_some_and(|l| l.tmux) || r.boolean("tmux", file.tmux)?.unwrap_or(false);
    let names = names(&r, &mut file)?;
    let reach = access(&r, launch, &mut file)?;
    let name = launch
        .and_then(|l| l.name.clone())
        .map(|n| crate::session::validate_name(&n).map(|_| n))
        .transpose()
        .map_err(|why| UsageError::new(format!("invalid --name: {why}")))?;
    let on_demand =
        launch.is_some_and(|l| l.on_demand) || r.boolean("on_demand", file.on_demand)?.unwrap_or(false);
    let root_volume = root_volume(&r, launch, file.root_volume_gb, file.root_volume_type.take())?;
    let instance_profile = r
        .string(
            "instance_profile",
            launch.and_then(|l| l.instance_profile.clone()),
            "--instance-profile",
            file.instance_profile.take(),
        )?
        .map(|(v, s)| validate_resource_name("instance_profile", v, &s))
        .transpose()?;
    let (subnet, security_groups) = network(&r, launch, &mut file)?;
    let packages = r
        .list("packages", launch.map(|l| l.packages.clone()), "--package", file.packages.take())?
        .map(|(values, source)| validate_packages(values, &source.unwrap_or(Source::Flag("--package"))))
        .transpose()?
        .unwrap_or_default();
    let setup = setup_script(&r, launch, file.setup.take(), file.setup_script.take())?;
    let forwarding = resolve_forwarding(cli, env, r.boolean("forward_agent", file.forward_agent)?)?;
    let state_dir = state_dir(env)?;
    let ssh_dir = env.var("HOME").map(|home| Path::new(&home).join(".ssh"));

    Ok(Settings {
        config_path,
        aws,
        output,
        verbosity: if g.quiet { 0 } else { 1 + g.verbose },
        progress: !g.no_progress && !g.quiet,
        instance_types,
        ami,
        user,
        max_runtime: times.max_runtime,
        max_runtime_cap: times.max_runtime_cap,
        idle_grace: times.idle_grace,
        kept_idle_grace: times.kept_idle_grace,
        boot_grace: times.boot_grace,
        watchdog_interval: times.watchdog_interval,
        connect_timeout: times.connect_timeout,
        setup_timeout: times.setup_timeout,
        ssh_port,
        spot_price_ratio: money.spot_price_ratio,
        on_demand_fallback,
        security_group_name: names.security_group_name,
        iam_role_name: names.iam_role_name,
        owner: names.owner,
        tags: names.tags,
        monthly_budget: money.monthly_budget,
        connect: reach.connect,
        proxy_command: reach.proxy_command,
        my_ip: reach.my_ip,
        allow_cidrs: reach.allow_cidrs,
        tmux,
        name,
        on_demand,
        root_volume,
        instance_profile,
        subnet,
        security_groups,
        on_demand_prices: money.on_demand_prices,
        packages,
        setup,
        profile_name: profile_name.map(|(name, _)| name),
        state_dir,
        ssh_dir,
        forwarding,
    })
}

/// Where the AWS calls go: region, AWS profile, endpoint.
fn aws_settings(
    r: &Resolver,
    g: &crate::cli::GlobalArgs,
    file: &mut FileConfig,
) -> Result<AwsSettings, UsageError> {
    let region = r.string("region", g.region.clone(), "--region", file.region.take())?;
    if let Some((region, source)) = &region {
        validate_region(region, source)?;
    }
    // The SDK reads AWS_PROFILE / AWS_REGION when the tool's own settings name none; they end up
    // in proxy commands and records just the same, so they are checked the same.
    if region.is_none() {
        for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            if let Some(value) = r.env.var(var).filter(|v| !v.is_empty()) {
                validate_region(&value, &Source::Env(var.into()))?;
            }
        }
    }
    let profile = r.string("profile", g.profile.clone(), "--profile", file.profile.take())?;
    match &profile {
        Some((name, source)) => validate_profile(name, source)?,
        None => {
            for var in ["AWS_PROFILE", "AWS_DEFAULT_PROFILE"] {
                if let Some(value) = r.env.var(var).filter(|v| !v.is_empty()) {
                    validate_profile(&value, &Source::Env(var.into()))?;
                }
            }
        }
    }
    let endpoint_url =
        match r.string("endpoint_url", g.endpoint_url.clone(), "--endpoint-url", file.endpoint_url.take())? {
            Some(found) => Some(found),
            None => r.env.var("AWS_ENDPOINT_URL").map(|v| (v, Source::Env("AWS_ENDPOINT_URL".into()))),
        };
    if let Some((url, source)) = &endpoint_url {
        validate_url(url, source)?;
    }
    let eice_endpoint_url = r.string("eice_endpoint_url", None, "", file.eice_endpoint_url.take())?;
    if let Some((url, source)) = &eice_endpoint_url {
        validate_ws_url(url, source)?;
    }
    Ok(AwsSettings {
        region: region.map(|(v, _)| v),
        profile: profile.map(|(v, _)| v),
        endpoint_url: endpoint_url.map(|(v, _)| v),
        eice_endpoint_url: eice_endpoint_url.map(|(v, _)| v),
    })
}

/// The image to boot and the user to log in as (the image's default unless set).
fn image(
    r: &Resolver,
    launch: Option<&crate::cli::LaunchArgs>,
    file: &mut FileConfig,
) -> Result<(AmiChoice, String), UsageError> {
    let ami = match r.string("ami", launch.and_then(|l| l.ami.clone()), "--ami", file.ami.take())? {
        Some((value, source)) => parse_ami(&value, &source)?,
        None => AmiChoice::Alias(AmiAlias::Ubuntu2404),
    };
    let user = match r.string("user", launch.and_then(|l| l.user.clone()), "--user", file.user.take())? {
        Some((value, source)) => validate_user(value, &source)?,
        None => match &ami {
            AmiChoice::Alias(alias) => alias.default_user().to_string(),
            AmiChoice::Id(_) => "ec2-user".to_string(),
        },
    };
    Ok((ami, user))
}

/// How long things may take: the deadline and its cap, the idle and boot graces, the
/// watchdog's interval, the connect and setup timeouts.
struct Durations {
    max_runtime: Duration,
    max_runtime_cap: Duration,
    idle_grace: Duration,
    kept_idle_grace: Duration,
    boot_grace: Duration,
    watchdog_interval: Duration,
    connect_timeout: Duration,
    setup_timeout: Duration,
}

fn durations(
    r: &Resolver,
    cli: &Cli,
    launch: Option<&crate::cli::LaunchArgs>,
    file: &mut FileConfig,
) -> Result<Durations, UsageError> {
    let duration = |key: &'static str,
                    flag: Option<String>,
                    flag_name: &'static str,
                    file: Option<String>,
                    default: &str| {
        match r.string(key, flag, flag_name, file)? {
            Some((value, source)) => parse_duration(key, &value, &source),
            None => Ok(humantime::parse_duration(default).expect("default durations parse")),
        }
    };
    let max_runtime_flag = match &cli.command {
        Command::Prices(args) => args.max_runtime.clone(),
        _ => launch.and_then(|l| l.max_runtime.clone()),
    };
    let times = Durations {
        max_runtime: duration(
            "max_runtime",
            max_runtime_flag,
            "--max-runtime",
            file.max_runtime.take(),
            "4h",
        )?,
        max_runtime_cap: duration("max_runtime_cap", None, "", file.max_runtime_cap.take(), "12h")?,
        idle_grace: duration(
            "idle_grace",
            launch.and_then(|l| l.idle_grace.clone()),
            "--idle-grace",
            file.idle_grace.take(),
            "2m",
        )?,
        kept_idle_grace: duration("kept_idle_grace", None, "", file.kept_idle_grace.take(), "30m")?,
        boot_grace: duration("boot_grace", None, "", file.boot_grace.take(), "10m")?,
        watchdog_interval: duration("watchdog_interval", None, "", file.watchdog_interval.take(), "5s")?,
        connect_timeout: duration("connect_timeout", None, "", file.connect_timeout.take(), "3m")?,
        setup_timeout: duration("setup_timeout", None, "", file.setup_timeout.take(), "30m")?,
    };
    if times.max_runtime > times.max_runtime_cap {
        return Err(UsageError::new(format!(
            "max_runtime {} is longer than max_runtime_cap {}: shorten it, or raise max_runtime_cap in the config",
            humantime::format_duration(times.max_runtime),
            humantime::format_duration(times.max_runtime_cap)
        )));
    }
    Ok(times)
}

fn ssh_port(r: &Resolver, file: &mut FileConfig) -> Result<u16, UsageError> {
    match r.string("ssh_port", None, "", file.ssh_port.map(|p| p.to_string()))? {
        Some((value, source)) => match value.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(UsageError::new(format!(
                "invalid ssh_port {value:?} ({source}): expected a TCP port from 1 to 65535, normally 22"
            ))),
        },
        None => Ok(22),
    }
}

/// What the tool may spend: the spot bid, the monthly budget, on-demand prices of the config.
struct Spending {
    spot_price_ratio: f64,
    monthly_budget: f64,
    on_demand_prices: BTreeMap<String, BTreeMap<String, f64>>,
}

fn spending(r: &Resolver, file: &mut FileConfig) -> Result<Spending, UsageError> {
    let spot_price_ratio = match r.number("spot_price_ratio", None, "", file.spot_price_ratio.take())? {
        Some((value, source)) if !(value > 0.0 && value <= 1.0) => {
            return Err(UsageError::new(format!(
                "invalid spot_price_ratio {value} ({source}): expected a fraction of the on-demand price in (0, 1], like 0.5"
            )));
        }
        Some((value, _)) => value,
        None => 0.5,
    };
    let monthly_budget = match r.number("monthly_budget", None, "", file.monthly_budget.take())? {
        Some((value, source)) if !(value >= 0.0 && value.is_finite()) => {
            return Err(UsageError::new(format!(
                "invalid monthly_budget {value} ({source}): expected US dollars, like 2.00"
            )));
        }
        Some((value, _)) => value,
        None => 2.0,
    };
    let mut on_demand_prices = BTreeMap::new();
    for (region, types) in file.on_demand_prices.take().unwrap_or_default() {
        let source = r.file_source("on_demand_prices");
        validate_region(&region, &source)?;
        let mut prices = BTreeMap::new();
        for (instance_type, price) in types {
            validate_instance_types(std::slice::from_ref(&instance_type), Some(&source))?;
            let price = price.value();
            if !(price > 0.0 && price.is_finite()) {
                return Err(UsageError::new(format!(
                    "invalid on-demand price {price} for {instance_type} in {region} ({source}): expected USD per hour, like 0.0208"
                )));
            }
            prices.insert(instance_type, price);
        }
        on_demand_prices.insert(region, prices);
    }
    Ok(Spending { spot_price_ratio, monthly_budget, on_demand_prices })
}

/// The names the tool gives what it makes, its owner tag and the user's extra tags.
struct Names {
    security_group_name: String,
    iam_role_name: String,
    owner: Option<String>,
    tags: BTreeMap<String, String>,
}

fn names(r: &Resolver, file: &mut FileConfig) -> Result<Names, UsageError> {
    let security_group_name = r
        .string("security_group_name", None, "", file.security_group_name.take())?
        .map(|(v, s)| validate_resource_name("security_group_name", v, &s))
        .transpose()?
        .unwrap_or_else(|| "ephemeral-admin-sg".into());
    let iam_role_name = r
        .string("iam_role_name", None, "", file.iam_role_name.take())?
        .map(|(v, s)| validate_resource_name("iam_role_name", v, &s))
        .transpose()?
        .unwrap_or_else(|| "SystemAdminTestingRole".into());
    let owner =
        r.string("owner", None, "", file.owner.take())?.map(|(v, s)| validate_owner(v, &s)).transpose()?;

    let tags = match file.tags.take() {
        Some(tags) => {
            let source = r.file_source("tags");
            validate_tags(&tags, &source)?;
            tags
        }
        None => BTreeMap::new(),
    };
    Ok(Names { security_group_name, iam_role_name, owner, tags })
}

/// How the box is reached: the connect mode, a proxy command, whom SSH is opened to.
struct Access {
    connect: ConnectMode,
    proxy_command: Option<String>,
    my_ip: Option<IpNet>,
    allow_cidrs: Vec<IpNet>,
}

fn access(
    r: &Resolver,
    launch: Option<&crate::cli::LaunchArgs>,
    file: &mut FileConfig,
) -> Result<Access, UsageError> {
    let proxy_command = r.string(
        "proxy_command",
        launch.and_then(|l| l.proxy_command.clone()),
        "--proxy-command",
        file.proxy_command.take(),
    )?;
    let connect = match (
        launch.and_then(|l| l.connect),
        r.string("connect", None, "--connect", file.connect.take())?,
    ) {
        (Some(mode), _) => mode,
        // A proxy command given on its own implies that mode.
        (None, _) if launch.is_some_and(|l| l.proxy_command.is_some()) => ConnectMode::ProxyCommand,
        (None, Some((value, source))) => parse_connect(&value, &source)?,
        (None, None) if proxy_command.is_some() => ConnectMode::ProxyCommand,
        (None, None) => ConnectMode::PublicIp,
    };
    if connect == ConnectMode::ProxyCommand && proxy_command.is_none() {
        return Err(UsageError::new(
            "connect mode proxy-command needs a command: pass --proxy-command \"CMD %h %p\" or set proxy_command",
        ));
    }

    let my_ip = r
        .string("my_ip", launch.and_then(|l| l.my_ip.clone()), "--my-ip", file.my_ip.take())?
        .map(|(value, source)| parse_host("my_ip", &value, &source))
        .transpose()?;
    let allow_cidrs = r
        .list("allow_cidr", launch.map(|l| l.allow_cidr.clone()), "--allow-cidr", file.allow_cidr.take())?
        .map(|(values, source)| {
            let source = source.unwrap_or(Source::Flag("--allow-cidr"));
            values.iter().map(|v| parse_cidr("allow_cidr", v, &source)).collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(Access { connect, proxy_command: proxy_command.map(|(v, _)| v), my_ip, allow_cidrs })
}

/// Where the box goes: a subnet (its VPC follows) and extra security groups.
fn network(
    r: &Resolver,
    launch: Option<&crate::cli::LaunchArgs>,
    file: &mut FileConfig,
) -> Result<(Option<String>, Vec<String>), UsageError> {
    let subnet = r
        .string("subnet", launch.and_then(|l| l.subnet.clone()), "--subnet", file.subnet.take())?
        .map(|(v, s)| validate_aws_id("subnet", "subnet", v, &s))
        .transpose()?;
    let security_groups = r
        .list(
            "security_groups",
            launch.map(|l| l.security_groups.clone()),
            "--security-group",
            file.security_groups.take(),
        )?
        .map(|(values, source)| {
            let source = source.unwrap_or(Source::Flag("--security-group"));
            let mut ids = Vec::new();
            for v in values {
                let id = validate_aws_id("security_groups", "sg", v, &source)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok::<_, UsageError>(ids)
        })
        .transpose()?
        .unwrap_or_default();
    Ok((subnet, security_groups))
}

/// The forwarding flags, checked before anything happens: every spec parses, and nothing asks
/// for what cannot be (forwards on a launch that does not stay connected, `-N` with a command,
/// `-A` with no agent to forward).
fn resolve_forwarding(
    cli: &Cli,
    env: &dyn Env,
    config_agent: Option<bool>,
) -> Result<Forwarding, UsageError> {
    let Some(flags) = cli.command.forward_args() else { return Ok(Forwarding::default()) };
    let forwards = crate::ssh::forward::Forwards::parse(&flags.local, &flags.remote, &flags.dynamic)
        .map_err(UsageError::new)?;
    let (command, tmux, record) = match &cli.command {
        Command::Launch(l) => (&l.command, l.tmux, l.record.is_some()),
        Command::Connect(c) => (&c.command, c.tmux, c.record.is_some()),
        _ => unreachable!("only launch and connect forward"),
    };
    let asked = !forwards.is_empty() || flags.no_command || flags.forward_agent;
    if asked && cli.command.launch_args().is_some_and(|l| l.detach) {
        return Err(UsageError::new(
            "forwarding lasts only while this client is connected, and --detach does not connect: launch with -N (forward until Ctrl-C) instead, or `connect ID -N -L …` later",
        ));
    }
    if flags.no_command && (!command.is_empty() || tmux || record) {
        return Err(UsageError::new(
            "-N means no command and no shell: leave out the command after --, --tmux and --record",
        ));
    }
    let agent_socket = env.var("SSH_AUTH_SOCK").map(PathBuf::from);
    if flags.forward_agent && agent_socket.is_none() {
        return Err(UsageError::new(
            "-A forwards your ssh-agent, but SSH_AUTH_SOCK is not set: start one (`eval $(ssh-agent)` and `ssh-add`)",
        ));
    }
    Ok(Forwarding {
        forwards,
        no_command: flags.no_command,
        agent: flags.forward_agent || config_agent.unwrap_or(false),
        agent_socket,
    })
}

/// Parses the config file; with a profile chosen, its table is laid over the top level first, so
/// every key works in a profile without code of its own.
fn read_config(
    path: &Path,
    text: &str,
    profile: Option<&(String, Source)>,
) -> Result<FileConfig, UsageError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| line_of_offset(text, span.start));
        let at = match line {
            Some(line) => format!("{}:{line}", path.display()),
            None => path.display().to_string(),
        };
        UsageError::new(format!("config {at}: {}; see config.example.toml for every key", e.message().trim()))
    })?;
    let profiles = file.profiles.clone().unwrap_or_default();
    for (name, table) in &profiles {
        check_profile(path, name, table)?;
    }
    let Some((name, _)) = profile else { return Ok(file) };
    let Some(chosen) = profiles.get(name) else { return Err(no_such_profile(profile, &profiles)) };
    let mut merged: toml::Table = toml::from_str(text).expect("parsed above");
    merged.remove("profiles");
    for (key, value) in chosen {
        for group in ALTERNATIVE_KEYS.iter().filter(|g| g.contains(&key.as_str())) {
            for other in group.iter() {
                merged.remove(*other);
            }
        }
        merged.insert(key.clone(), value.clone());
    }
    let mut merged: FileConfig = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| {
        UsageError::new(format!("config {} with profile {name}: {}", path.display(), e.message().trim()))
    })?;
    merged.profiles = Some(profiles);
    Ok(merged)
}

/// A profile holds the same keys as the top level, except profiles.
fn check_profile(path: &Path, name: &str, table: &toml::Table) -> Result<(), UsageError> {
    let at = format!("config {}: [profiles.{name}]", path.display());
    if table.contains_key("profiles") {
        return Err(UsageError::new(format!("{at}: a profile cannot hold profiles")));
    }
    toml::Value::Table(table.clone()).try_into::<FileConfig>().map(|_| ()).map_err(|e| {
        UsageError::new(format!("{at}: {}; see config.example.toml for every key", e.message().trim()))
    })
}

fn no_such_profile(
    profile: Option<&(String, Source)>,
    defined: &BTreeMap<String, toml::Table>,
) -> UsageError {
    let (name, source) = profile.expect("a profile was asked for");
    let defined = if defined.is_empty() {
        "the config defines no profiles (add a [profiles.NAME] table)".to_string()
    } else {
        format!("defined: {}", defined.keys().cloned().collect::<Vec<_>>().join(", "))
    };
    UsageError::new(format!("no profile {name:?} ({source}): {defined}"))
}

/// Package names as apt and dnf take them (`jq`, `postgresql-client-16`, `nginx=1.24*` is not
/// one: versions are a package manager's own syntax, so only letters, digits and `+ - . _ : =`).
fn validate_packages(packages: Vec<String>, source: &Source) -> Result<Vec<String>, UsageError> {
    for name in &packages {
        let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.len() <= 200
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "+-._:=".contains(c));
        if !ok {
            return Err(UsageError::new(format!(
                "invalid package {name:?} ({source}): expected a package name like jq or postgresql-client"
            )));
        }
    }
    Ok(packages)
}

/// `setup` (a file) or `setup_script` (inline): the one from the stronger source wins; both
/// from the same source is ambiguous. Only `launch` reads the file (`terminate` must work
/// whatever became of it).
fn setup_script(
    r: &Resolver,
    launch: Option<&crate::cli::LaunchArgs>,
    file_path: Option<String>,
    file_inline: Option<String>,
) -> Result<Option<SetupScript>, UsageError> {
    if launch.is_none() {
        return Ok(None);
    }
    let path_flag = launch.and_then(|l| l.setup.as_ref()).map(|p| p.to_string_lossy().into_owned());
    let path = r.string("setup", path_flag, "--setup", file_path)?;
    let inline_flag = launch.and_then(|l| l.setup_script.clone());
    let inline = r.string("setup_script", inline_flag, "--setup-script", file_inline)?;
    let use_path = match (&path, &inline) {
        (Some((_, a)), Some((_, b))) if a.rank() == b.rank() => {
            return Err(UsageError::new(format!(
                "both setup ({a}) and setup_script ({b}) are set: keep one (setup names a file, setup_script is the script itself)"
            )));
        }
        (Some((_, a)), Some((_, b))) => a.rank() > b.rank(),
        (path, _) => path.is_some(),
    };
    if !use_path {
        return Ok(inline.map(|(text, _)| SetupScript { text, origin: "the inline setup script".into() }));
    }
    let (value, source) = path.expect("chosen above");
    let file = match &source {
        // A config's relative path is relative to the config file.
        Source::File { path: config, .. } => config.parent().unwrap_or(Path::new(".")).join(&value),
        _ => PathBuf::from(&value),
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        UsageError::new(format!("cannot read the setup script {} ({source}): {e}", file.display()))
    })?;
    Ok(Some(SetupScript { text, origin: file.display().to_string() }))
}

/// `root_volume_gb` and `root_volume_type`, checked against what EBS accepts.
fn root_volume(
    r: &Resolver,
    launch: Option<&crate::cli::LaunchArgs>,
    file_gb: Option<u32>,
    file_type: Option<String>,
) -> Result<RootVolume, UsageError> {
    let mut volume = RootVolume::default();
    let gb_flag = launch.and_then(|l| l.root_volume_gb).map(|g| g.to_string());
    if let Some((value, source)) =
        r.string("root_volume_gb", gb_flag, "--root-volume-gb", file_gb.map(|g| g.to_string()))?
    {
        volume.gb = match value.trim().parse::<u32>() {
            Ok(gb) if ROOT_VOLUME_GB_RANGE.contains(&gb) => gb,
            _ => {
                return Err(UsageError::new(format!(
                    "invalid root_volume_gb {value:?} ({source}): expected whole GB from {} to {}",
                    ROOT_VOLUME_GB_RANGE.start(),
                    ROOT_VOLUME_GB_RANGE.end()
                )));
            }
        };
    }
    let type_flag = launch.and_then(|l| l.root_volume_type.clone());
    if let Some((value, source)) = r.string("root_volume_type", type_flag, "--root-volume-type", file_type)? {
        volume.kind = match VolumeKind::from_name(value.trim()) {
            Some(kind) => kind,
            None if matches!(value.trim(), "io1" | "io2") => {
                return Err(UsageError::new(format!(
                    "root_volume_type {value:?} ({source}) needs provisioned IOPS, which ephemeral-admin does not set: use gp3 (3000 IOPS included) or gp2"
                )));
            }
            None => {
                return Err(UsageError::new(format!(
                    "invalid root_volume_type {value:?} ({source}): expected gp3 or gp2"
                )));
            }
        };
    }
    Ok(volume)
}

/// `--instance-type` of `launch` or `prices`: like every flag, it beats the environment and the
/// config file.
fn instance_type_flags(command: &Command) -> Option<Vec<String>> {
    let types = match command {
        Command::Launch(args) => &args.instance_types,
        Command::Prices(args) => &args.instance_types,
        _ => return None,
    };
    (!types.is_empty()).then(|| types.clone())
}

/// Finds the config file: --config, $EPHEMERAL_ADMIN_CONFIG, then the XDG location.
/// A file named explicitly must exist; the XDG default may be absent.
fn locate_config(cli: &Cli, env: &dyn Env) -> Result<(Option<PathBuf>, Option<String>), UsageError> {
    let explicit =
        cli.global.config.clone().map(|p| (p, "--config")).or_else(|| {
            env.var("EPHEMERAL_ADMIN_CONFIG").map(|p| (PathBuf::from(p), "$EPHEMERAL_ADMIN_CONFIG"))
        });
    if let Some((path, from)) = explicit {
        return match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Some(path), Some(text))),
            // `init` writes the file it was pointed at.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && matches!(cli.command, Command::Init(_)) => {
                Ok((Some(path), None))
            }
            Err(e) => Err(UsageError::new(format!(
                "cannot read config file {} (from {from}): {e}; run `ephemeral-admin init` to write one",
                path.display()
            ))),
        };
    }
    let Some(path) = default_config_path(env) else { return Ok((None, None)) };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((Some(path), Some(text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((None, None)),
        Err(e) => Err(UsageError::new(format!("cannot read config file {}: {e}", path.display()))),
    }
}

/// `$XDG_CONFIG_HOME/ephemeral-admin/config.toml`, else `~/.config/ephemeral-admin/config.toml`.
pub fn default_config_path(env: &dyn Env) -> Option<PathBuf> {
    let base = env
        .var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env.var("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("ephemeral-admin").join("config.toml"))
}

fn state_dir(env: &dyn Env) -> Result<PathBuf, UsageError> {
    let base = env
        .var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| env.var("HOME").map(|home| Path::new(&home).join(".local").join("state")))
        .ok_or_else(|| {
            UsageError::new("neither XDG_STATE_HOME nor HOME is set: set one so sessions can be recorded")
        })?;
    Ok(base.join("ephemeral-admin"))
}

/// A list value and where it came from (none for a default).
type Sourced<T> = (T, Option<Source>);

/// Reads one key from flag, environment and file, in that order.
struct Resolver<'a> {
    env: &'a dyn Env,
    path: Option<PathBuf>,
    text: String,
    /// The chosen profile and the keys it sets: their lines are in its table.
    profile: Option<(String, std::collections::BTreeSet<String>)>,
}

impl Resolver<'_> {
    fn file_source(&self, key: &str) -> Source {
        let path = self.path.clone().unwrap_or_default();
        // Where the chosen profile's table starts, when the value is the profile's.
        let start = match &self.profile {
            Some((name, keys)) if keys.contains(key) => self
                .text
                .lines()
                .position(|l| l.trim().replace(['"', ' '], "") == format!("[profiles.{name}]"))
                .unwrap_or(0),
            _ => 0,
        };
        let line = self.text.lines().skip(start).position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.starts_with(&format!("[{key}"))
        });
        Source::File { path, line: line.map(|i| i + start + 1) }
    }

    fn string(
        &self,
        key: &'static str,
        flag: Option<String>,
        flag_name: &'static str,
        file: Option<String>,
    ) -> Result<Option<(String, Source)>, UsageError> {
        if let Some(value) = flag {
            return Ok(Some((value, Source::Flag(flag_name))));
        }
        let var = env_name(key);
        if let Some(value) = self.env.var(&var) {
            return Ok(Some((value, Source::Env(var))));
        }
        Ok(file.map(|value| (value, self.file_source(key))))
    }

    fn list(
        &self,
        key: &'static str,
        flag: Option<Vec<String>>,
        flag_name: &'static str,
        file: Option<Vec<String>>,
    ) -> Result<Option<Sourced<Vec<String>>>, UsageError> {
        if let Some(values) = flag.filter(|v| !v.is_empty()) {
            return Ok(Some((values, Some(Source::Flag(flag_name)))));
        }
        let var = env_name(key);
        if let Some(value) = self.env.var(&var) {
            let values = value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            return Ok(Some((values, Some(Source::Env(var)))));
        }
        Ok(file.map(|values| (values, Some(self.file_source(key)))))
    }

    fn number(
        &self,
        key: &'static str,
        flag: Option<f64>,
        flag_name: &'static str,
        file: Option<Number>,
    ) -> Result<Option<(f64, Source)>, UsageError> {
        if let Some(value) = flag {
            return Ok(Some((value, Source::Flag(flag_name))));
        }
        let var = env_name(key);
        if let Some(value) = self.env.var(&var) {
            let source = Source::Env(var);
            let number = value.trim().trim_start_matches('$').parse::<f64>().map_err(|_| {
                UsageError::new(format!("invalid {key} {value:?} ({source}): expected a number like 0.5"))
            })?;
            return Ok(Some((number, source)));
        }
        Ok(file.map(|n| (n.value(), self.file_source(key))))
    }

    fn boolean(&self, key: &'static str, file: Option<bool>) -> Result<Option<bool>, UsageError> {
        let var = env_name(key);
        if let Some(value) = self.env.var(&var) {
            return match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(Some(true)),
                "0" | "false" | "no" | "off" => Ok(Some(false)),
                _ => Err(UsageError::new(format!(
                    "invalid {key} {value:?} (from ${var}): expected true or false"
                ))),
            };
        }
        Ok(file)
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses a duration; a bare number is refused because its unit would be a guess.
pub fn parse_duration_value(value: &str) -> Result<Duration, String> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err("expected a duration like 2m".into());
    }
    match humantime::parse_duration(trimmed) {
        Ok(d) if d.is_zero() => Err("expected a duration longer than zero, like 2m".into()),
        Ok(d) => Ok(d),
        Err(_) => Err("expected a duration like 2m, 90s or 1h30m".into()),
    }
}

fn parse_duration(key: &str, value: &str, source: &Source) -> Result<Duration, UsageError> {
    parse_duration_value(value)
        .map_err(|why| UsageError::new(format!("invalid {key} {value:?} ({source}): {why}")))
}

fn parse_output(value: &str, source: &Source) -> Result<OutputFormat, UsageError> {
    match value {
        "text" => Ok(OutputFormat::Text),
        "json" => Ok(OutputFormat::Json),
        _ => Err(UsageError::new(format!("invalid output {value:?} ({source}): expected text or json"))),
    }
}

fn parse_connect(value: &str, source: &Source) -> Result<ConnectMode, UsageError> {
    match ConnectMode::from_name(value) {
        Some(mode) => Ok(mode),
        None => Err(UsageError::new(format!(
            "invalid connect {value:?} ({source}): expected public-ip, private-ip, proxy-command or ssm"
        ))),
    }
}

fn validate_region(region: &str, source: &Source) -> Result<(), UsageError> {
    // us-east-1, eu-central-2, us-gov-west-1, ap-southeast-4, il-central-1 ...
    let parts: Vec<&str> = region.split('-').collect();
    let ok = parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty();
    if ok {
        Ok(())
    } else {
        Err(UsageError::new(format!(
            "invalid region {region:?} ({source}): expected a region like us-east-1"
        )))
    }
}

/// An AWS profile name as the AWS CLI takes it from a `[profile NAME]` section: letters, digits
/// and `-_.@+=,/:`; never whitespace, a control character or shell syntax (it is passed on to
/// the `aws` CLI in proxy commands).
fn validate_profile(profile: &str, source: &Source) -> Result<(), UsageError> {
    let ok = !profile.is_empty()
        && profile.len() <= 128
        && profile.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@+=,/:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(UsageError::new(format!(
            "invalid AWS profile {profile:?} ({source}): a profile name is letters, digits and - _ . @ + = , / : (the NAME of a [profile NAME] section in ~/.aws/config)"
        )))
    }
}

/// Checks a region the SDK found by itself (in the profile's config), like the settings' own.
pub fn check_region(region: &str) -> Result<(), UsageError> {
    let path = PathBuf::from("~/.aws/config (the profile's region)");
    validate_region(region, &Source::File { path, line: None })
}

fn validate_url(url: &str, source: &Source) -> Result<(), UsageError> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => Ok(()),
        _ => Err(UsageError::new(format!(
            "invalid endpoint URL {url:?} ({source}): expected http(s)://host[:port]"
        ))),
    }
}

fn validate_ws_url(url: &str, source: &Source) -> Result<(), UsageError> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "ws" | "wss") && parsed.host().is_some() => Ok(()),
        _ => Err(UsageError::new(format!(
            "invalid EICE endpoint URL {url:?} ({source}): expected ws(s)://host[:port]"
        ))),
    }
}

/// EC2 instance types look like `t3.small`, `m7i-flex.large`, `u-6tb1.metal`.
pub fn looks_like_instance_type(t: &str) -> bool {
    let Some((family, size)) = t.split_once('.') else { return false };
    let family_ok = !family.is_empty()
        && family.starts_with(|c: char| c.is_ascii_lowercase())
        && family.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && family.chars().any(|c| c.is_ascii_digit());
    let size_ok = !size.is_empty() && size.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    family_ok && size_ok
}

fn validate_instance_types(types: &[String], source: Option<&Source>) -> Result<(), UsageError> {
    let from = source.map(|s| format!(" ({s})")).unwrap_or_default();
    if types.is_empty() {
        return Err(UsageError::new(format!(
            "instance_types is empty{from}: name at least one, like t3.small"
        )));
    }
    for t in types {
        if !looks_like_instance_type(t) {
            return Err(UsageError::new(format!(
                "invalid instance type {t:?}{from}: expected an EC2 type like t3.small"
            )));
        }
    }
    let first = Arch::of_instance_type(&types[0]);
    if let Some(other) = types.iter().find(|t| Arch::of_instance_type(t) != first) {
        return Err(UsageError::new(format!(
            "instance types {} and {other} have different CPU architectures{from}: one AMI cannot boot both; list only x86 or only Graviton types",
            types[0]
        )));
    }
    Ok(())
}

fn parse_ami(value: &str, source: &Source) -> Result<AmiChoice, UsageError> {
    if let Some((_, alias)) = AmiAlias::ALL.iter().find(|(name, _)| *name == value) {
        return Ok(AmiChoice::Alias(*alias));
    }
    if let Some(hex) = value.strip_prefix("ami-")
        && (hex.len() == 8 || hex.len() == 17)
        && hex.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Ok(AmiChoice::Id(value.to_string()));
    }
    Err(UsageError::new(format!(
        "invalid ami {value:?} ({source}): expected ubuntu-24.04, al2023, or an id like ami-0123456789abcdef0"
    )))
}

fn validate_user(user: String, source: &Source) -> Result<String, UsageError> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(user)
    } else {
        Err(UsageError::new(format!("invalid user {user:?} ({source}): expected a login name like ubuntu")))
    }
}

/// An EC2 id of one kind (`subnet-…`, `sg-…`): the prefix, then 8 or 17 hex digits.
fn validate_aws_id(key: &str, prefix: &str, id: String, source: &Source) -> Result<String, UsageError> {
    let hex = id.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')).unwrap_or_default();
    let ok = matches!(hex.len(), 8 | 17) && hex.chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(id)
    } else {
        Err(UsageError::new(format!(
            "invalid {key} {id:?} ({source}): expected an id like {prefix}-0123456789abcdef0"
        )))
    }
}

fn validate_resource_name(key: &str, name: String, source: &Source) -> Result<String, UsageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
    if ok {
        Ok(name)
    } else {
        Err(UsageError::new(format!(
            "invalid {key} {name:?} ({source}): use up to 64 letters, digits and + = , . @ _ -"
        )))
    }
}

/// The owner goes into a tag value the box reads through IMDS: tag value characters only
/// (letters, digits, spaces and `_ . : / = + - @`), at most 256.
fn validate_owner(owner: String, source: &Source) -> Result<String, UsageError> {
    let ok = !owner.trim().is_empty()
        && owner.chars().count() <= 256
        && owner.chars().all(crate::session::tags::valid_tag_value_char);
    if ok {
        Ok(owner)
    } else {
        Err(UsageError::new(format!(
            "invalid owner {owner:?} ({source}): use up to 256 letters, digits, spaces and _ . : / = + - @ (e.g. your email)"
        )))
    }
}

/// Tag keys must stay within the IMDS tag character set so the box can read them.
pub fn valid_tag_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.starts_with("aws:")
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "+-=.,_:@".contains(c))
}

fn validate_tags(tags: &BTreeMap<String, String>, source: &Source) -> Result<(), UsageError> {
    for (key, value) in tags {
        if !valid_tag_key(key) {
            return Err(UsageError::new(format!(
                "invalid tag key {key:?} ({source}): use letters, digits and + - = . , _ : @ only (readable through instance metadata), not starting with aws:"
            )));
        }
        if crate::session::tags::is_reserved(key) {
            return Err(UsageError::new(format!(
                "tag key {key:?} ({source}) is set by ephemeral-admin itself: pick another key"
            )));
        }
        if value.chars().count() > 256 {
            return Err(UsageError::new(format!("tag {key:?} ({source}): value longer than 256 characters")));
        }
    }
    Ok(())
}

/// `my_ip` is one address: SSH opens for that host only. A network (even written as
/// `0.0.0.0/0`) must be asked for with `--allow-cidr`, which says what it opens.
fn parse_host(key: &str, value: &str, source: &Source) -> Result<IpNet, UsageError> {
    let net = parse_cidr(key, value, source)?;
    if net.prefix_len() != net.max_prefix_len() {
        return Err(UsageError::new(format!(
            "{key} {value:?} ({source}) is a network of {} addresses, not your address: give one host \
             (203.0.113.7), or pass the network with --allow-cidr, which opens SSH to all of it",
            address_count(&net)
        )));
    }
    Ok(net)
}

/// "256", "4294967296", "2^64": how many addresses a network holds, for warnings.
pub fn address_count(net: &IpNet) -> String {
    let bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if bits < 64 { (1u64 << bits).to_string() } else { format!("2^{bits}") }
}

fn parse_cidr(key: &str, value: &str, source: &Source) -> Result<IpNet, UsageError> {
    let value = value.trim();
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = value.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(UsageError::new(format!(
        "invalid {key} {value:?} ({source}): expected a CIDR like 203.0.113.7/32 or 2001:db8::1/128"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn resolve_with(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings, UsageError> {
        let mut argv = vec!["ephemeral-admin"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("clap accepts these arguments");
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |name: &str| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or_else(|| match name {
                "HOME" => Some("/nonexistent-home".into()),
                _ => None,
            })
        };
        resolve(&cli, &env)
    }

    #[test]
    fn defaults_without_any_source() {
        let s = resolve_with(&["list"], &[]).unwrap();
        assert_eq!(s.instance_types, ["t3.small", "t3.micro"]);
        assert_eq!(s.ami, AmiChoice::Alias(AmiAlias::Ubuntu2404));
        assert_eq!(s.user, "ubuntu");
        assert_eq!(s.max_runtime, Duration::from_secs(4 * 3600));
        assert_eq!(s.max_runtime_cap, Duration::from_secs(12 * 3600));
        assert_eq!(s.idle_grace, Duration::from_secs(120));
        assert_eq!(s.kept_idle_grace, Duration::from_secs(1800));
        assert_eq!(s.spot_price_ratio, 0.5);
        assert!(s.on_demand_fallback);
        assert_eq!(s.security_group_name, "ephemeral-admin-sg");
        assert_eq!(s.iam_role_name, "SystemAdminTestingRole");
        assert_eq!(s.monthly_budget, 2.0);
        assert_eq!(s.connect, ConnectMode::PublicIp);
        assert_eq!(s.ssh_port, 22);
        assert_eq!(s.state_dir, PathBuf::from("/nonexistent-home/.local/state/ephemeral-admin"));
    }

    #[test]
    fn the_eice_mode_and_its_dial_url_resolve_and_a_non_websocket_url_is_bad_input() {
        let vars = [("EPHEMERAL_ADMIN_EICE_ENDPOINT_URL", "ws://127.0.0.1:4567")];
        let s = resolve_with(&["launch", "--connect", "eice"], &vars).unwrap();
        assert_eq!(s.connect, ConnectMode::Eice);
        assert_eq!(s.aws.eice_endpoint_url.as_deref(), Some("ws://127.0.0.1:4567"));
        let vars = [("EPHEMERAL_ADMIN_EICE_ENDPOINT_URL", "http://127.0.0.1:4567")];
        let err = resolve_with(&["list"], &vars).unwrap_err().to_string();
        assert!(err.contains("expected ws(s)://host[:port]"), "{err}");
    }

    #[test]
    fn every_instance_type_flag_beats_the_file() {
        let dir = std::env::temp_dir().join(format!("ea-settings-types-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, "instance_types = [\"t3.small\", \"t3.micro\"]\n").unwrap();
        let f = file.to_str().unwrap();
        for command in ["prices", "launch"] {
            let s = resolve_with(&["--config", f, command, "--instance-type", "m5.large"], &[]).unwrap();
            assert_eq!(s.instance_types, ["m5.large"], "{command}");
        }
        let s = resolve_with(&["--config", f, "prices"], &[]).unwrap();
        assert_eq!(s.instance_types, ["t3.small", "t3.micro"]);
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = std::env::temp_dir().join(format!("ea-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, "max_runtime = \"3h\"\nidle_grace = \"5m\"\nmonthly_budget = 3\n").unwrap();
        let f = file.to_str().unwrap();
        let s = resolve_with(
            &["--config", f, "launch", "--max-runtime", "1h"],
            &[("EPHEMERAL_ADMIN_MAX_RUNTIME", "2h"), ("EPHEMERAL_ADMIN_IDLE_GRACE", "7m")],
        )
        .unwrap();
        assert_eq!(s.max_runtime, Duration::from_secs(3600), "flag wins");
        assert_eq!(s.idle_grace, Duration::from_secs(420), "env beats file");
        assert_eq!(s.monthly_budget, 3.0, "file beats default, integers accepted");
        let s = resolve_with(&["--config", f, "list"], &[]).unwrap();
        assert_eq!(s.max_runtime, Duration::from_secs(3 * 3600), "file beats default");
    }

    #[test]
    fn ssh_port_comes_from_env_or_file_and_must_be_a_port() {
        let s = resolve_with(&["list"], &[("EPHEMERAL_ADMIN_SSH_PORT", "2222")]).unwrap();
        assert_eq!(s.ssh_port, 2222);
        for bad in ["0", "65536", "ssh"] {
            let e = resolve_with(&["list"], &[("EPHEMERAL_ADMIN_SSH_PORT", bad)]).unwrap_err();
            assert!(
                e.0.starts_with(&format!("invalid ssh_port {bad:?} (from $EPHEMERAL_ADMIN_SSH_PORT)")),
                "{}",
                e.0
            );
        }
    }

    #[test]
    fn bare_number_duration_is_refused_with_a_hint() {
        let e = resolve_with(&["launch", "--max-runtime", "2"], &[]).unwrap_err();
        assert_eq!(e.0, "invalid max_runtime \"2\" (from --max-runtime): expected a duration like 2m");
    }

    #[test]
    fn unknown_config_key_names_key_file_and_line() {
        let dir = std::env::temp_dir().join(format!("ea-settings-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, "region = \"us-east-1\"\n\nmax_runtim = \"3h\"\n").unwrap();
        let e = resolve_with(&["--config", file.to_str().unwrap(), "list"], &[]).unwrap_err();
        assert!(e.0.contains(&format!("{}:3", file.display())), "{}", e.0);
        assert!(e.0.contains("max_runtim"), "{}", e.0);
    }

    #[test]
    fn arch_follows_the_instance_family() {
        assert_eq!(Arch::of_instance_type("t3.small"), Arch::X86_64);
        assert_eq!(Arch::of_instance_type("t4g.small"), Arch::Arm64);
        assert_eq!(Arch::of_instance_type("m7gd.large"), Arch::Arm64);
        assert_eq!(Arch::of_instance_type("m7i-flex.large"), Arch::X86_64);
        assert_eq!(Arch::of_instance_type("g5.xlarge"), Arch::X86_64);
        let e = resolve_with(&["launch", "--instance-type", "t3.small", "--instance-type", "t4g.small"], &[])
            .unwrap_err();
        assert!(e.0.contains("different CPU architectures"), "{}", e.0);
    }

    #[test]
    fn proxy_command_alone_implies_its_mode() {
        let s = resolve_with(&["launch", "--proxy-command", "nc %h %p"], &[]).unwrap();
        assert_eq!(s.connect, ConnectMode::ProxyCommand);
        let e = resolve_with(&["launch", "--connect", "proxy-command"], &[]).unwrap_err();
        assert!(e.0.contains("--proxy-command"), "{}", e.0);
    }

    fn config(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ea-settings-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    #[test]
    fn a_profile_sits_between_the_environment_and_the_top_level() {
        let file = config(
            "profiles",
            "max_runtime = \"3h\"\nidle_grace = \"5m\"\nmonthly_budget = 3\n\n\
             [profiles.db]\nmax_runtime = \"2h\"\nidle_grace = \"6m\"\ninstance_types = [\"t3.large\"]\n\
             packages = [\"postgresql-client\"]\n",
        );
        let f = file.to_str().unwrap();
        let s = resolve_with(
            &["--config", f, "--profile-name", "db", "launch", "--max-runtime", "1h"],
            &[("EPHEMERAL_ADMIN_IDLE_GRACE", "7m")],
        )
        .unwrap();
        assert_eq!(s.max_runtime, Duration::from_secs(3600), "flag beats profile");
        assert_eq!(s.idle_grace, Duration::from_secs(420), "env beats profile");
        assert_eq!(s.instance_types, ["t3.large"], "profile beats default");
        assert_eq!(s.packages, ["postgresql-client"]);
        assert_eq!(s.monthly_budget, 3.0, "top level where the profile is silent");
        let s = resolve_with(&["--config", f, "launch"], &[("EPHEMERAL_ADMIN_PROFILE_NAME", "db")]).unwrap();
        assert_eq!(s.max_runtime, Duration::from_secs(7200), "profile beats top level");
        let s = resolve_with(&["--config", f, "launch"], &[]).unwrap();
        assert_eq!(s.max_runtime, Duration::from_secs(3 * 3600), "no profile: top level");
        assert!(s.packages.is_empty());
    }

    #[test]
    fn profile_errors_name_the_profile() {
        let file = config("profile-errors", "[profiles.db]\nmax_runtime = \"2\"\n[profiles.web]\n");
        let f = file.to_str().unwrap();
        let e = resolve_with(&["--config", f, "--profile-name", "x", "list"], &[]).unwrap_err();
        assert_eq!(e.0, "no profile \"x\" (from --profile-name): defined: db, web");
        let e = resolve_with(&["--config", f, "--profile-name", "db", "list"], &[]).unwrap_err();
        assert!(e.0.starts_with("invalid max_runtime \"2\" (in "), "{}", e.0);
        assert!(e.0.contains("config.toml:2)"), "the profile's own line: {}", e.0);
        let file = config("profile-unknown-key", "[profiles.db]\nmax_runtim = \"2h\"\n");
        let e = resolve_with(&["--config", file.to_str().unwrap(), "list"], &[]).unwrap_err();
        assert!(e.0.contains("[profiles.db]") && e.0.contains("max_runtim"), "{}", e.0);
        let e = resolve_with(&["--profile-name", "db", "list"], &[]).unwrap_err();
        assert!(e.0.contains("defines no profiles"), "{}", e.0);
    }

    #[test]
    fn setup_is_a_file_or_inline_and_packages_are_names() {
        let file = config("setup", "setup = \"prep.sh\"\n[profiles.inline]\nsetup_script = \"echo hi\"\n");
        std::fs::write(file.with_file_name("prep.sh"), "echo prep\n").unwrap();
        let f = file.to_str().unwrap();
        let s = resolve_with(&["--config", f, "launch"], &[]).unwrap();
        let setup = s.setup.unwrap();
        assert_eq!(setup.text, "echo prep\n", "relative to the config file");
        assert!(setup.origin.ends_with("prep.sh"));
        let s = resolve_with(&["--config", f, "--profile-name", "inline", "launch"], &[]).unwrap();
        assert_eq!(s.setup.unwrap().text, "echo hi", "the profile's inline script replaces the file");
        let s = resolve_with(&["--config", f, "launch", "--setup-script", "true"], &[]).unwrap();
        assert_eq!(s.setup.unwrap().text, "true", "a flag beats the file");
        let both = config("setup-both", "setup = \"a.sh\"\nsetup_script = \"true\"\n");
        let e = resolve_with(&["--config", both.to_str().unwrap(), "launch"], &[]).unwrap_err();
        assert!(e.0.starts_with("both setup (in "), "{}", e.0);
        assert!(resolve_with(&["--config", both.to_str().unwrap(), "list"], &[]).unwrap().setup.is_none());
        let e = resolve_with(&["launch", "--package", "jq; rm -rf /"], &[]).unwrap_err();
        assert!(e.0.starts_with("invalid package \"jq; rm -rf /\" (from --package)"), "{}", e.0);
    }

    #[test]
    fn bare_ip_becomes_a_host_cidr() {
        let s = resolve_with(&["launch", "--my-ip", "203.0.113.7"], &[]).unwrap();
        assert_eq!(s.my_ip.unwrap().to_string(), "203.0.113.7/32");
        let s = resolve_with(&["launch", "--my-ip", "2001:db8::1"], &[]).unwrap();
        assert_eq!(s.my_ip.unwrap().to_string(), "2001:db8::1/128");
        for wide in ["0.0.0.0/0", "203.0.113.0/24", "::/0"] {
            let e = resolve_with(&["launch", "--my-ip", wide], &[]).unwrap_err();
            assert!(e.0.contains("--allow-cidr"), "{wide}: {}", e.0);
        }
        let s = resolve_with(&["launch", "--allow-cidr", "0.0.0.0/0"], &[]).unwrap();
        assert_eq!(s.allow_cidrs[0].to_string(), "0.0.0.0/0");
    }
}
