//! Property tests for every builder that turns data into command text (issue #31, "no shell text
//! from data"): hostile strings (quotes, `$()`, backticks, `;`, newlines, `${IFS}`, `%`, spaces,
//! unicode) go through the builder, and the real `/bin/sh` (and, for ssh-config, the real OpenSSH
//! config parser, `ssh -G`) must give back exactly the words that went in. Nothing here quotes
//! anything itself: the only splitting is done by `sh` and `ssh`.

use std::process::Command;

use proptest::prelude::*;

use super::{ProxyWord, expand_proxy_command, proxy_template, shell_quote};
use crate::commands::attach::ssm_proxy_command;
use crate::ssh::config_file::{config_arg, config_command, config_path};

/// Strings built from the pieces that break naive command lines, plus any other character.
fn hostile() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "'",
            "\"",
            "$(echo pwned)",
            "`echo pwned`",
            ";",
            "\n",
            "${IFS}",
            "%",
            "%p",
            "%%",
            "%i",
            " ",
            "\\",
            "#",
            "*",
            "~",
            "&",
            "|",
            "<",
            ">",
            "!",
            "=",
            "\t",
            "naïve 日本 🦀",
            "-",
            "x;touch${IFS}F;#",
        ])
        .prop_map(String::from),
        "[a-z0-9.-]{1,4}",
        any::<char>().prop_filter("argv cannot hold NUL", |c| *c != '\0').prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

/// The words `sh -c` makes of `command`: it runs with `printf '%s\0'` in front, so every word the
/// command line holds (its program name too) comes back, and nothing in it runs.
fn sh_words(command: &str) -> Vec<String> {
    let out = Command::new("sh").arg("-c").arg(format!("printf '%s\\0' {command}")).output().unwrap();
    assert!(out.status.success(), "sh refused {command:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("sh printed UTF-8");
    text.strip_suffix('\0').map(|t| t.split('\0').map(String::from).collect()).unwrap_or_default()
}

/// OpenSSH's own `%`-expansion of a ProxyCommand (`%%`, `%h`, `%p`, `%r`; OpenSSH refuses any
/// other), as `ssh` does before handing the line to the shell.
fn openssh_expand(text: &str, host: &str, port: u16, user: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, c == '%') {
            (_, false) => out.push(c),
            _ => match chars.next() {
                Some('%') => out.push('%'),
                Some('h') => out.push_str(host),
                Some('p') => out.push_str(&port.to_string()),
                Some('r') => out.push_str(user),
                other => panic!("OpenSSH would refuse %{other:?} in {text:?}"),
            },
        }
    }
    out
}

/// `ssh -G`: what OpenSSH reads from `config` for host `x`, as (keyword, rest of the line).
fn openssh_reads(config: &str) -> Vec<(String, String)> {
    let file = std::env::temp_dir().join(format!("ea-quote-props-{}.cfg", std::process::id()));
    std::fs::write(&file, config).unwrap();
    let out = Command::new("ssh").arg("-G").arg("-F").arg(&file).arg("x").output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "ssh -G refused:\n{config}\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn ssm_words(iid: &str, port: u16, region: &str, profile: &str) -> Vec<String> {
    let port = format!("portNumber={port}");
    strings(&[
        "aws",
        "ssm",
        "start-session",
        "--target",
        iid,
        "--document-name",
        "AWS-StartSSHSession",
        "--parameters",
        &port,
        "--region",
        region,
        "--profile",
        profile,
    ])
}

proptest! {
    // No regression files: a run leaves nothing in the checkout (scripts/test checks).
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// A remote command line (`connect ID -- CMD`, the setup follower): the box's shell splits it
    /// back into the argv.
    #[test]
    fn a_remote_command_line_splits_back_into_its_argv(argv in prop::collection::vec(hostile(), 1..5)) {
        prop_assert_eq!(sh_words(&shell_quote(&argv)), argv);
    }

    /// The SSM route through the embedded client: template, then `%`-expansion with hostile
    /// values, then `sh -c`.
    #[test]
    fn the_ssm_proxy_command_runs_only_aws_with_the_data_as_words(
        region in hostile(), profile in hostile(), iid in hostile(), port in 1u16..,
    ) {
        let command = expand_proxy_command(&ssm_proxy_command(&region, Some(&profile)), "h", port, &iid, "u");
        prop_assert_eq!(sh_words(&command), ssm_words(&iid, port, &region, &profile));
    }

    /// A user's `--proxy-command` template: the values put in for `%h`, `%r` and `%i` stay data.
    #[test]
    fn expanded_values_stay_words_of_a_proxy_command(host in hostile(), user in hostile(), iid in hostile()) {
        let command = expand_proxy_command("ssh -W %h:%p %r@bastion %i", &host, 22, &iid, &user);
        prop_assert_eq!(sh_words(&command), vec!["ssh".into(), "-W".into(), format!("{host}:22"), format!("{user}@bastion"), iid]);
    }

    /// ssh-config output (`User` stands for the single-word directives): OpenSSH's config parser reads each value back exactly, and the
    /// ProxyCommand it runs (SSM preset, or this binary as `proxy` for eice) is the argv that
    /// was meant. A value the file cannot carry (a control character or nothing; `${` in a path; a
    /// backslash the parser takes for an escape) is refused, never written.
    #[test]
    fn ssh_config_lines_read_back_as_the_data(
        region in hostile(), profile in hostile(), iid in hostile(), alias in hostile(), dir in hostile(),
    ) {
        let path = std::path::PathBuf::from(format!("/tmp/{dir}/id_ed25519"));
        let ssm = config_command(&super::expand_instance_token(&ssm_proxy_command(&region, Some(&profile)), &iid));
        let eice = config_command(&proxy_template(&[ProxyWord::Data(&dir), ProxyWord::Data(&region), ProxyWord::Token("proxy")]));
        let (alias_arg, key) = (config_arg("the host alias", &alias), config_path("the key file", &path));
        let control = |s: &str| s.chars().any(char::is_control);
        prop_assert_eq!(alias_arg.is_err(), control(&alias) || alias.is_empty());
        prop_assert_eq!(key.is_err(), control(&dir) || dir.contains("${"));
        for (built, data) in [(&ssm, format!("{region}{profile}{iid}")), (&eice, format!("{dir}{region}"))] {
            prop_assert!(built.is_ok() || control(&data) || data.contains('\\'), "{built:?}");
        }
        let (Ok(alias_arg), Ok(key), Ok(ssm), Ok(eice)) = (alias_arg, key, ssm, eice) else { return Ok(()) };
        for (proxy, meant) in [(ssm, ssm_words(&iid, 2222, &region, &profile)), (eice, strings(&[&dir, &region, "proxy"]))] {
            let config = format!("Host x\n    User {alias_arg}\n    IdentityFile {key}\n    ProxyCommand {proxy}\n");
            let read = openssh_reads(&config);
            let get = |k: &str| read.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
            prop_assert_eq!(get("user"), alias.clone());
            prop_assert_eq!(openssh_expand(&get("identityfile"), "h", 22, "u"), path.display().to_string());
            prop_assert_eq!(sh_words(&openssh_expand(&get("proxycommand"), "h", 2222, "u")), meant);
        }
    }
}
