//! The box's user-data: a `#cloud-config` document that fences the instance metadata service
//! off for every user but root (first, at every boot), installs our pinned first host key (and no
//! other), authorizes the session's client key, turns password login off, makes sshd probe its
//! clients (a vanished laptop's half-open connection must not keep the box up), arms a boot-time
//! poweroff at the hard cap (in case the watchdog never runs), installs the host-key rotation
//! script, installs and starts the watchdog that ends the box, and last runs the session's
//! packages and setup script (see `setup.sh`: it logs to a file the launch follows over SSH).
//!
//! Rendered deterministically (same inputs, same bytes) so it can be snapshot-tested. The only
//! secret in it is the first host private key, which only lives until the first connection: the
//! CLI then has the box make its own (`hostkey.sh`, `crate::commands::hostkey`). No AWS
//! credentials, no client private key. Root on the box and anyone allowed
//! `ec2:DescribeInstanceAttribute` can read user-data, and so the setup script.

use std::fmt::Write as _;
use std::io::Write as _;

use base64::Engine as _;

/// The on-box watchdog (POSIX sh, linted by shellcheck in CI).
pub const WATCHDOG_SCRIPT: &str = include_str!("watchdog.sh");
/// Its systemd unit.
pub const WATCHDOG_UNIT: &str = include_str!("watchdog.service");

pub const WATCHDOG_PATH: &str = "/usr/local/sbin/ephemeral-admin-watchdog";
pub const WATCHDOG_ENV_PATH: &str = "/etc/ephemeral-admin/watchdog.env";
pub const WATCHDOG_UNIT_PATH: &str = "/etc/systemd/system/ephemeral-admin-watchdog.service";
/// First in `sshd_config.d` (the first value of an option wins).
pub const SSHD_DROPIN_PATH: &str = "/etc/ssh/sshd_config.d/00-ephemeral-admin.conf";
/// Keys only. sshd probes a silent client every 10 s and drops it after 3 unanswered probes: a
/// client that vanished without closing its connection is gone within about 40 s, so the
/// watchdog sees the box idle and its idle grace starts.
pub const SSHD_DROPIN: &str = "# ephemeral-admin: keys only; notice a client that vanished without closing its connection.\n\
    PasswordAuthentication no\nKbdInteractiveAuthentication no\nClientAliveInterval 10\nClientAliveCountMax 3\n";

/// The box's host-key rotation (POSIX sh, linted by shellcheck in CI), run as root over the
/// first pinned connection (`crate::commands::hostkey`). `new` makes a fresh Ed25519 key beside
/// sshd's (run again: the same key) and prints its public half; the private half never leaves the
/// box. `switch KEY` renames that key over sshd's (the user-data key's file is gone), reloads sshd
/// (it re-executes itself on SIGHUP; open connections stay), waits up to 15 s until sshd serves
/// the new key, and prints `switched`; run again with the same key it only reloads. Each step can
/// be cut off and run again. `EA_SSH_DIR`, `EA_SSHD_PIDFILE` and `EA_SSH_PORT` move it for the
/// box simulator (a real box sets none; sudo would not pass them anyway).
pub const HOSTKEY_SCRIPT: &str = include_str!("hostkey.sh");
pub const HOSTKEY_PATH: &str = "/usr/local/sbin/ephemeral-admin-hostkey";
/// What the client runs it with (`sh -c HOSTKEY_RUN hostkey ARGS...`): as root, through `sudo -n`
/// unless the login user is root. (`EA_HOSTKEY_SCRIPT` runs another copy with sh, for the box
/// simulator, whose boxes share one machine and have no sudo; a real box sets it nowhere.)
pub const HOSTKEY_RUN: &str = "h=/usr/local/sbin/ephemeral-admin-hostkey; \
    if [ -n \"${EA_HOSTKEY_SCRIPT:-}\" ]; then exec sh \"$EA_HOSTKEY_SCRIPT\" \"$@\"; \
    elif [ \"$(id -u)\" = 0 ]; then exec \"$h\" \"$@\"; else exec sudo -n \"$h\" \"$@\"; fi";

/// The instance metadata service, IPv4 and IPv6 (Nitro).
pub const IMDS_ADDRESSES: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];

/// The resume relay of `connect = "eice"` boxes (python3 stdlib, which every cloud-init image
/// has): it holds the connection to sshd while the client moves to a new tunnel
/// (`crate::ssh::resume`); each tunnel reaches it through an outer SSH connection's exec of
/// [`RESUME_ATTACH`].
pub const RESUME_SCRIPT: &str = include_str!("resume.py");
/// Its systemd unit (127.0.0.1:2022 only, a dynamic user).
pub const RESUME_UNIT: &str = include_str!("resume.service");
pub const RESUME_PATH: &str = "/usr/local/lib/ephemeral-admin/resume.py";
pub const RESUME_UNIT_PATH: &str = "/etc/systemd/system/ephemeral-admin-resume.service";
/// What the client execs over each tunnel's outer SSH connection: a pipe to the relay.
/// (`EA_RESUME_ADDRESS` and `EA_RESUME_SCRIPT` move it, for the box simulator, whose boxes share
/// one machine; a real box sets neither.)
pub const RESUME_ATTACH: &str = "exec python3 \"${EA_RESUME_SCRIPT:-/usr/local/lib/ephemeral-admin/resume.py}\" --attach \"${EA_RESUME_ADDRESS:-127.0.0.1:2022}\"";

/// AWS refuses user-data above 16 KB "in raw form, before it is base64-encoded" (EC2 User Guide,
/// "Work with instance user data").
pub const MAX_USER_DATA: usize = 16 * 1024;
/// AWS's API models bound the base64 text at 21847 characters (Auto Scaling's `UserData`, in a
/// ValidationError users have hit), one short of 16 KiB's base64: staying within it costs one
/// byte (16383 raw bytes fit) and is safe whichever check EC2 applies.
const MAX_USER_DATA_BASE64: usize = 21847;

/// Whether `raw` bytes of user-data pass both limits.
pub fn fits(raw: usize) -> bool {
    raw <= MAX_USER_DATA && raw.div_ceil(3) * 4 <= MAX_USER_DATA_BASE64
}

/// Installs the packages and runs the setup script, as cloud-init's last runcmd (POSIX sh,
/// linted by shellcheck in CI).
pub const SETUP_RUNNER: &str = include_str!("setup.sh");
pub const SETUP_RUNNER_PATH: &str = "/usr/local/sbin/ephemeral-admin-setup";
/// The user's setup script on the box (root only).
pub const SETUP_SCRIPT_PATH: &str = "/etc/ephemeral-admin/setup";
/// Where the runner logs and leaves `setup.status`, unless `EA_SETUP_DIR` says otherwise (the
/// box simulator gives each box its own).
pub const SETUP_DIR: &str = "/var/log/ephemeral-admin";

/// Everything the box needs to know, decided on the laptop.
#[derive(Debug, Clone)]
pub struct BoxConfig<'a> {
    pub session_id: &'a str,
    pub host_key_private: &'a str,
    pub host_key_public: &'a str,
    pub client_key_public: &'a str,
    /// The hard deadline baked in, for when instance metadata does not answer (Unix seconds).
    pub deadline_epoch: i64,
    /// Launch + `max_runtime_cap` (Unix seconds): no deadline tag moves the box past it, and a
    /// boot-time timer powers the box off then even if the watchdog never starts.
    pub cap_epoch: i64,
    pub idle_grace_secs: u64,
    pub boot_grace_secs: u64,
    pub interval_secs: u64,
    pub install_tmux: bool,
    /// Runs the resume relay (`connect = "eice"`).
    pub resume_relay: bool,
    /// Installed by the setup runner (logged, and its failure reported), unlike tmux.
    pub packages: &'a [String],
    pub setup_script: Option<&'a str>,
}

impl BoxConfig<'_> {
    /// Whether the launch has setup to wait for.
    pub fn has_setup(&self) -> bool {
        !self.packages.is_empty() || self.setup_script.is_some()
    }
}

/// The user-data as sent: the rendering itself, or gzip'd when that is above AWS's limit
/// (cloud-init unpacks gzip user-data).
pub fn encode(rendered: &str) -> Result<Vec<u8>, TooLarge> {
    if fits(rendered.len()) {
        return Ok(rendered.as_bytes().to_vec());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(rendered.as_bytes()).expect("writing to memory");
    let packed = gz.finish().expect("writing to memory");
    if fits(packed.len()) {
        Ok(packed)
    } else {
        Err(TooLarge { rendered: rendered.len(), gzipped: packed.len() })
    }
}

/// User-data AWS would refuse even gzip'd.
#[derive(Debug, thiserror::Error)]
#[error(
    "the box's user-data would be {} ({} gzip'd), above the 16 KiB AWS accepts: shorten the setup script, or have it download the rest on the box",
    kib(*rendered),
    kib(*gzipped)
)]
pub struct TooLarge {
    pub rendered: usize,
    pub gzipped: usize,
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// Renders the cloud-config.
pub fn render(config: &BoxConfig) -> String {
    let mut out = String::with_capacity(8 * 1024);
    out.push_str("#cloud-config\n");
    out.push_str("# ephemeral-admin session ");
    out.push_str(config.session_id);
    out.push_str(": pinned host key, session key, watchdog.\n");
    // Password login is off in our sshd drop-in, not through `ssh_pwauth`: cloud-init applies
    // that by restarting sshd after it has started, which cut a client that had just connected.
    out.push_str("ssh_deletekeys: true\n");
    // cloud-init generates only missing keys, and ssh_keys has already written the Ed25519 one:
    // nothing is generated. (An empty list means the same but fails cloud-init's schema.)
    out.push_str("ssh_genkeytypes: [ed25519]\n");
    out.push_str("ssh_keys:\n");
    out.push_str("  ed25519_private: |\n");
    indent(&mut out, config.host_key_private, 4);
    let _ = writeln!(out, "  ed25519_public: {}", config.host_key_public.trim());
    out.push_str("ssh_authorized_keys:\n");
    let _ = writeln!(out, "  - {}", config.client_key_public.trim());
    if config.install_tmux {
        out.push_str("packages: [tmux]\n");
    }
    out.push_str("bootcmd:\n");
    bootcmd_imds_fence(&mut out);
    bootcmd_cap(&mut out, config.cap_epoch);
    out.push_str("write_files:\n");
    let env = format!(
        "EA_SESSION_ID={}\nEA_DEADLINE={}\nEA_CAP={}\nEA_IDLE_GRACE={}\nEA_BOOT_GRACE={}\nEA_INTERVAL={}\n",
        config.session_id,
        config.deadline_epoch,
        config.cap_epoch,
        config.idle_grace_secs,
        config.boot_grace_secs,
        config.interval_secs
    );
    write_file(&mut out, WATCHDOG_ENV_PATH, "0644", &env);
    write_file(&mut out, WATCHDOG_PATH, "0755", WATCHDOG_SCRIPT);
    write_file(&mut out, WATCHDOG_UNIT_PATH, "0644", WATCHDOG_UNIT);
    write_file(&mut out, SSHD_DROPIN_PATH, "0644", SSHD_DROPIN);
    write_file(&mut out, HOSTKEY_PATH, "0700", HOSTKEY_SCRIPT);
    if config.resume_relay {
        write_file(&mut out, RESUME_PATH, "0644", RESUME_SCRIPT);
        write_file(&mut out, RESUME_UNIT_PATH, "0644", RESUME_UNIT);
    }
    if config.has_setup() {
        write_file(&mut out, SETUP_RUNNER_PATH, "0755", SETUP_RUNNER);
    }
    if let Some(script) = config.setup_script {
        // Base64: any bytes arrive as they are (a YAML block would need care with indentation).
        let _ = writeln!(out, "  - path: {SETUP_SCRIPT_PATH}\n    permissions: '0700'\n    encoding: b64");
        let encoded = base64::engine::general_purpose::STANDARD.encode(script);
        let _ = writeln!(out, "    content: {encoded}");
    }
    out.push_str("runcmd:\n");
    if config.resume_relay {
        // First: an eice client waits for it (cloud-init's final stage is the first hook after
        // write_files has put the unit in place).
        out.push_str("  - [systemctl, start, --no-block, ephemeral-admin-resume.service]\n");
    }
    out.push_str(
        "  - systemctl try-reload-or-restart ssh.service || systemctl try-reload-or-restart sshd.service\n",
    );
    out.push_str("  - [systemctl, daemon-reload]\n");
    out.push_str("  - [systemctl, enable, --now, ephemeral-admin-watchdog.service]\n");
    if config.resume_relay {
        out.push_str("  - [systemctl, enable, --now, ephemeral-admin-resume.service]\n");
    }
    if config.has_setup() {
        let script = if config.setup_script.is_some() { SETUP_SCRIPT_PATH } else { "-" };
        let _ = write!(out, "  - ['{SETUP_RUNNER_PATH}', '{script}'");
        for package in config.packages {
            // Validated in settings: letters, digits and + - . _ : = only.
            let _ = write!(out, ", '{package}'");
        }
        out.push_str("]\n");
    }
    out
}

/// Every boot, first: the instance metadata service (the user-data with its first host key and
/// setup script, the box role's credentials) answers root only. A policy-routing rule refuses a
/// route to it for every other uid (`ip rule ... uidrange 1-4294967294 prohibit`: connect fails
/// with EACCES): iproute2 and the kernel's uid routing are on every cloud image (Debian, Ubuntu,
/// Amazon Linux), unlike nft or iptables, and no firewall reload (`nft flush ruleset`, ufw)
/// drops it. systemd-networkd would remove rules it did not make when it restarts: told not to.
/// The watchdog runs as root; the resume relay (a dynamic user) never asks the IMDS.
fn bootcmd_imds_fence(out: &mut String) {
    out.push_str("  - |\n");
    out.push_str("    mkdir -p /etc/systemd/networkd.conf.d\n");
    out.push_str("    printf '[Network]\\nManageForeignRoutingPolicyRules=no\\n' \\\n");
    out.push_str("      >/etc/systemd/networkd.conf.d/ephemeral-admin-imds.conf\n");
    for (family, address) in [("-4", IMDS_ADDRESSES[0]), ("-6", IMDS_ADDRESSES[1])] {
        let rule = format!("pref 90 to {address} uidrange 1-4294967294 prohibit");
        let _ = writeln!(out, "    ip {family} rule del {rule} 2>/dev/null");
        let _ = writeln!(out, "    ip {family} rule add {rule} ||");
        let _ = writeln!(out, "      echo 'ephemeral-admin: no IMDS fence for {address}' >/dev/console");
    }
    out.push_str("    true\n");
}

/// Every boot, right after the fence: a systemd timer powers the box off at the cap, whatever
/// happens to the watchdog. In the background: bootcmd runs before sysinit.target, which the
/// timer's start job waits for, so waiting for it here deadlocks the boot (seen on a real Debian
/// 13 VM, `--no-block` included). OnCalendar fires at the cap itself; OnActiveSec covers a cap
/// already past when the timer starts. No `shutdown -P` fallback: without logind it powers off
/// at once.
fn bootcmd_cap(out: &mut String, cap_epoch: i64) {
    out.push_str("  - |\n");
    let _ = writeln!(out, "    c={cap_epoch}; l=$((c - $(date +%s))); [ \"$l\" -gt 0 ] || l=1");
    out.push_str("    (timeout 900 systemd-run --unit=ephemeral-admin-cap \\\n");
    out.push_str("      --description='ephemeral-admin: hard cap, powering off' --on-active=\"${l}s\" \\\n");
    out.push_str("      --on-calendar=\"$(date -u -d \"@$c\" '+%Y-%m-%d %H:%M:%S') UTC\" \\\n");
    out.push_str("      --timer-property=AccuracySec=1s systemctl poweroff >/dev/null 2>&1 ||\n");
    out.push_str("      echo 'ephemeral-admin: could not arm the cap timer' >/dev/console) &\n");
}

fn write_file(out: &mut String, path: &str, permissions: &str, content: &str) {
    let _ = writeln!(out, "  - path: {path}");
    let _ = writeln!(out, "    permissions: '{permissions}'");
    out.push_str("    content: |\n");
    indent(out, content, 6);
}

fn indent(out: &mut String, text: &str, spaces: usize) {
    let pad = " ".repeat(spaces);
    for line in text.trim_end_matches('\n').lines() {
        if !line.is_empty() {
            out.push_str(&pad);
        }
        out.push_str(line);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SessionKeys;
    use std::io::Read as _;

    /// The configuration every test starts from (a session of the same id and times).
    fn base(keys: &SessionKeys) -> BoxConfig<'_> {
        BoxConfig {
            host_key_private: &keys.host.private_openssh,
            host_key_public: &keys.host.public_openssh,
            client_key_public: &keys.client.public_openssh,
            ..base_with_no_keys()
        }
    }

    fn base_with_no_keys() -> BoxConfig<'static> {
        BoxConfig {
            session_id: "abcdefgh",
            host_key_private: "",
            host_key_public: "",
            client_key_public: "",
            deadline_epoch: 1_795_370_400,
            cap_epoch: 1_795_399_200,
            idle_grace_secs: 120,
            boot_grace_secs: 600,
            interval_secs: 5,
            install_tmux: false,
            resume_relay: false,
            packages: &[],
            setup_script: None,
        }
    }

    fn sample(keys: &SessionKeys) -> String {
        render(&BoxConfig { install_tmux: true, ..base(keys) })
    }

    #[test]
    fn renders_identically_for_the_same_inputs_and_fits_the_limit() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let a = sample(&keys);
        assert_eq!(a, sample(&keys));
        // It goes as it is, and a setup script has room: gzip'd (which `encode` does once the
        // plain text passes the limit) it takes under half the limit (5 KiB today). Plain, the host-key
        // rotation and the watchdog's session count (issue #31) left about 3 KiB before gzip.
        assert!(a.len() < MAX_USER_DATA * 7 / 8, "user-data is {} bytes", a.len());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, a.as_bytes()).unwrap();
        let packed = gz.finish().unwrap().len();
        assert!(packed < MAX_USER_DATA / 2, "user-data is {packed} bytes gzip'd");
        assert!(a.starts_with("#cloud-config\n"));
    }

    /// A fixed test-only host key and client key, so the rendering can be compared byte for byte
    /// with the committed snapshot. `UPDATE_SNAPSHOTS=1 cargo test` rewrites it after a change.
    #[test]
    fn matches_the_committed_snapshot() {
        let rendered = render(&BoxConfig {
            host_key_private: include_str!("testdata/host_ed25519"),
            host_key_public: include_str!("testdata/host_ed25519.pub"),
            client_key_public: include_str!("testdata/client_ed25519.pub"),
            ..base_with_no_keys()
        });
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/userdata/testdata/user-data.snapshot");
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &rendered).unwrap();
        }
        let snapshot = std::fs::read_to_string(path).expect("snapshot exists (UPDATE_SNAPSHOTS=1 writes it)");
        assert_eq!(rendered, snapshot, "user-data changed: review, then UPDATE_SNAPSHOTS=1 cargo test");
    }

    #[test]
    fn parses_as_yaml_and_installs_exactly_the_pinned_host_key() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let text = sample(&keys);
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
        assert_eq!(doc["ssh_deletekeys"], serde_yaml_ng::Value::Bool(true));
        assert!(doc.get("ssh_pwauth").is_none(), "cloud-init would restart a running sshd for it");
        let generated = doc["ssh_genkeytypes"].as_sequence().unwrap();
        assert!(
            generated.iter().all(|t| t.as_str() == Some("ed25519")),
            "no other key type is generated (ed25519 exists already): {generated:?}"
        );
        let host_keys = doc["ssh_keys"].as_mapping().unwrap();
        assert_eq!(host_keys.len(), 2, "only the Ed25519 pair: {host_keys:?}");
        let public = crate::keys::parse_public(doc["ssh_keys"]["ed25519_public"].as_str().unwrap()).unwrap();
        assert_eq!(crate::keys::fingerprint(&public), keys.host.fingerprint);
        let private =
            russh::keys::PrivateKey::from_openssh(doc["ssh_keys"]["ed25519_private"].as_str().unwrap())
                .unwrap();
        assert_eq!(private.public_key(), &public, "the private half matches the pinned public key");
        let authorized = doc["ssh_authorized_keys"].as_sequence().unwrap();
        assert_eq!(authorized.len(), 1);
        assert_eq!(authorized[0].as_str().unwrap(), keys.client.public_openssh);

        let files = doc["write_files"].as_sequence().unwrap();
        let file =
            |path: &str| files.iter().find(|f| f["path"].as_str() == Some(path)).unwrap()["content"].clone();
        assert_eq!(
            file(WATCHDOG_PATH).as_str().unwrap(),
            WATCHDOG_SCRIPT,
            "the script arrives byte for byte"
        );
        assert_eq!(file(WATCHDOG_UNIT_PATH).as_str().unwrap(), WATCHDOG_UNIT);
        let env = file(WATCHDOG_ENV_PATH);
        assert!(env.as_str().unwrap().contains("EA_DEADLINE=1795370400\n"));
        let runcmd = serde_yaml_ng::to_string(&doc["runcmd"]).unwrap();
        assert!(runcmd.contains("ephemeral-admin-watchdog.service"));
        assert!(runcmd.contains("try-reload-or-restart ssh.service"), "sshd rereads the drop-in: {runcmd}");
    }

    /// A half-open client is noticed within about 45 s; the cap binds the watchdog and a
    /// boot-time timer that does not depend on it.
    #[test]
    fn probes_clients_and_arms_the_cap_at_boot() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&sample(&keys)).unwrap();
        let files = doc["write_files"].as_sequence().unwrap();
        let file = |path: &str| {
            files.iter().find(|f| f["path"].as_str() == Some(path)).unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let dropin = file(SSHD_DROPIN_PATH);
        let value = |key: &str| -> u64 {
            let line =
                dropin.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {dropin}"));
            line[key.len()..].trim().parse().unwrap()
        };
        assert!(
            dropin.contains("\nPasswordAuthentication no\n")
                && dropin.contains("\nKbdInteractiveAuthentication no\n")
        );
        let noticed = value("ClientAliveInterval") * (value("ClientAliveCountMax") + 1);
        assert!((1..=45).contains(&noticed), "a dead client is dropped after {noticed} s");
        assert!(file(WATCHDOG_ENV_PATH).contains("EA_CAP=1795399200\n"));
        let bootcmd = doc["bootcmd"].as_sequence().unwrap();
        assert_eq!(bootcmd.len(), 2, "the IMDS fence, then the cap");
        let script = bootcmd[1].as_str().unwrap();
        assert!(
            script.contains("c=1795399200; l=$((c - $(date +%s)))") && script.contains("systemctl poweroff"),
            "{script}"
        );
        assert!(script.trim_end().ends_with('&'), "waiting for the timer's start job deadlocks the boot");
        assert!(!script.contains("shutdown"), "shutdown -P without logind powers off at once");
    }

    #[test]
    fn setup_runs_last_with_the_script_byte_for_byte() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let script = "  indented first line\n\tweird: yaml: [x\n#!not a shebang here\n";
        let packages = ["jq".to_string(), "postgresql-client".to_string()];
        let mut config = BoxConfig { packages: &packages, setup_script: Some(script), ..base(&keys) };
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&render(&config)).expect("valid YAML");
        let files = doc["write_files"].as_sequence().unwrap();
        let file = |path: &str| files.iter().find(|f| f["path"].as_str() == Some(path)).unwrap().clone();
        let sent = file(SETUP_SCRIPT_PATH);
        assert_eq!(sent["encoding"].as_str(), Some("b64"));
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(sent["content"].as_str().unwrap()).unwrap();
        assert_eq!(decoded, script.as_bytes());
        assert_eq!(file(SETUP_RUNNER_PATH)["content"].as_str().unwrap(), SETUP_RUNNER);
        let runcmd = doc["runcmd"].as_sequence().unwrap();
        let last: Vec<&str> =
            runcmd.last().unwrap().as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(
            last,
            [SETUP_RUNNER_PATH, SETUP_SCRIPT_PATH, "jq", "postgresql-client"],
            "after the watchdog"
        );

        config.setup_script = None;
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&render(&config)).unwrap();
        let last = doc["runcmd"].as_sequence().unwrap().last().unwrap().clone();
        assert_eq!(last[1].as_str(), Some("-"), "packages only");
        config.packages = &[];
        assert!(!render(&config).contains(SETUP_RUNNER_PATH), "no setup, no runner");
    }

    #[test]
    fn an_eice_box_runs_the_resume_relay_byte_for_byte_and_other_boxes_do_not() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let mut config = BoxConfig { resume_relay: true, ..base(&keys) };
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&render(&config)).expect("valid YAML");
        let files = doc["write_files"].as_sequence().unwrap();
        let file = |path: &str| files.iter().find(|f| f["path"].as_str() == Some(path)).cloned();
        assert_eq!(file(RESUME_PATH).unwrap()["content"].as_str().unwrap(), RESUME_SCRIPT);
        let unit = file(RESUME_UNIT_PATH).unwrap()["content"].as_str().unwrap().to_string();
        assert!(
            unit.contains(&format!(
                "ExecStart=/usr/bin/python3 {RESUME_PATH} --listen 127.0.0.1:2022 --to 127.0.0.1:22"
            )),
            "{unit}"
        );
        assert!(unit.contains("DynamicUser=yes"), "{unit}");
        // The client's exec finds the script where it is written and the relay where it listens.
        let relay = format!("127.0.0.1:{}", crate::ssh::resume::RELAY_PORT);
        assert!(RESUME_ATTACH.contains(RESUME_PATH) && RESUME_ATTACH.contains(&relay), "{RESUME_ATTACH}");
        assert!(unit.contains(&format!("--listen {relay} ")), "loopback only: {unit}");
        let runcmd = serde_yaml_ng::to_string(&doc["runcmd"]).unwrap();
        assert!(runcmd.contains("ephemeral-admin-resume.service"), "{runcmd}");
        let sent = encode(&render(&config)).expect("AWS takes it (gzip'd: the relay is 11 KiB)");
        assert!(fits(sent.len()), "{} bytes", sent.len());

        config.resume_relay = false;
        let text = render(&config);
        assert!(!text.contains(RESUME_PATH) && !text.contains("ephemeral-admin-resume"), "{text}");
    }

    /// First thing at every boot: no route to the IMDS (v4 and v6) for any uid but root, kept
    /// across a networkd restart, and never failing the boot.
    #[test]
    fn fences_the_imds_off_for_non_root_users_first_at_every_boot() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&sample(&keys)).unwrap();
        let fence = doc["bootcmd"][0].as_str().unwrap();
        for (family, address) in [("-4", "169.254.169.254"), ("-6", "fd00:ec2::254")] {
            let rule = format!("ip {family} rule add pref 90 to {address} uidrange 1-4294967294 prohibit");
            assert!(fence.contains(&rule), "{rule} in {fence}");
            let del = format!("ip {family} rule del pref 90 to {address}");
            assert!(fence.find(&del).unwrap() < fence.find(&rule).unwrap(), "no duplicate at a reboot");
        }
        assert!(fence.contains("ManageForeignRoutingPolicyRules=no"), "{fence}");
        assert!(fence.trim_end().ends_with("true"), "a failed fence is reported, not a failed boot");
    }

    /// The rotation script arrives byte for byte, root only, and the client's command finds it.
    #[test]
    fn installs_the_host_key_rotation_for_root_only() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&sample(&keys)).unwrap();
        let files = doc["write_files"].as_sequence().unwrap();
        let file = files.iter().find(|f| f["path"].as_str() == Some(HOSTKEY_PATH)).unwrap();
        assert_eq!(file["content"].as_str().unwrap(), HOSTKEY_SCRIPT);
        assert_eq!(file["permissions"].as_str(), Some("0700"));
        assert!(HOSTKEY_RUN.contains(HOSTKEY_PATH) && HOSTKEY_RUN.contains("sudo -n"), "{HOSTKEY_RUN}");
    }

    #[test]
    fn user_data_is_gzipped_above_16_kib_and_refused_above_it_gzipped() {
        assert!(fits(16383) && !fits(16384), "16384 bytes are 21848 base64 characters, one too many");
        let small = "#cloud-config\n".to_string();
        assert_eq!(encode(&small).unwrap(), small.as_bytes());
        let big = format!("#cloud-config\n{}", "# the same line again and again\n".repeat(1000));
        let packed = encode(&big).unwrap();
        assert!(packed.starts_with(&[0x1f, 0x8b]) && packed.len() <= MAX_USER_DATA);
        let mut out = String::new();
        flate2::read::GzDecoder::new(&packed[..]).read_to_string(&mut out).unwrap();
        assert_eq!(out, big);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: String = (0..40_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let e = encode(&noise).unwrap_err();
        assert!(e.gzipped > MAX_USER_DATA, "{e}");
        assert!(e.to_string().contains("above the 16 KiB AWS accepts"), "{e}");
    }

    #[test]
    fn carries_no_credentials_and_no_client_private_key() {
        let keys = SessionKeys::generate("abcdefgh").unwrap();
        let text = sample(&keys);
        assert!(!text.contains(keys.client.private_openssh.as_str()));
        // Exactly one private key block: the host key's.
        assert_eq!(text.matches("BEGIN OPENSSH PRIVATE KEY").count(), 1);
        for secret in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_secret"] {
            assert!(!text.contains(secret), "{secret}");
        }
    }
}
