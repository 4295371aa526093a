//! Setup before the shell or command: `packages` and a `setup` script run on the box through
//! cloud-init (the box simulator runs the user-data's runcmd like cloud-init, with stub package
//! managers that record the install), `launch` streams their log to stderr and waits, a failure
//! is its exit status and the log's tail (box torn down unless `--keep`), the 16 KiB user-data
//! limit is checked before any AWS call (gzip first); and `[profiles.NAME]` bundles of settings
//! chosen with `--profile-name`.

use std::path::PathBuf;

use base64::Engine;
use serde_json::Value;

use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

fn write_script(user: &User, name: &str, text: &str) -> PathBuf {
    let path = user.home.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn live_instances(cloud: &LocalCloud) -> Vec<Value> {
    let state = cloud.state();
    state["instances"].as_array().unwrap().iter().filter(|i| i["state"] != "terminated").cloned().collect()
}

/// The user-data of the only instance the cloud holds, as sent (base64-decoded, not unpacked).
fn sent_user_data(cloud: &LocalCloud) -> Vec<u8> {
    let state = cloud.state();
    let instances = state["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{instances:#?}");
    let b64 = instances[0]["user_data_base64"].as_str().expect("user data");
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[test]
fn setup_output_streams_to_stderr_and_the_command_runs_after_it() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let script = write_script(
        &user,
        "prep.sh",
        "echo 'setup: first line'\nsleep 1\necho ready > \"$HOME/made-by-setup\"\necho 'setup: last line'\n",
    );
    let args = attached_args(
        &proxy,
        &[
            "--package",
            "jq",
            "--setup",
            script.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "cat \"$HOME/made-by-setup\"",
        ],
    );
    let run = user.run(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "ready\n", "the command saw the file the setup made; only its output on stdout");
    let at =
        |needle: &str| run.stderr.find(needle).unwrap_or_else(|| panic!("{needle:?} in:\n{}", run.stderr));
    // The package manager ran first (the simulator's stub says what it was asked), then the script.
    assert!(at("installing jq") < at("apt-get") && at("apt-get") < at("setup: first line"));
    assert!(run.stderr.contains("install jq"), "{}", run.stderr);
    assert!(at("setup: first line") < at("setup: last line") && at("setup: last line") < at("setup done"));
    assert_nothing_left(&cloud);
}

#[test]
fn a_failing_setup_gives_its_status_and_log_tail_and_the_box_goes_unless_kept() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let script = "echo 'step one'\necho 'step two: broken' >&2\nexit 3\necho 'never here'\n";
    let run = user.run(&attached_args(&proxy, &["--setup-script", script, "--", "echo", "command ran"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "the command never ran: {}", run.stdout);
    let error = run.stderr.find("error: setup failed on the box with exit status 3").expect(&run.stderr);
    let after = &run.stderr[error..];
    assert!(after.contains("\n  step one\n  step two: broken"), "the log's tail follows: {}", run.stderr);
    assert!(!run.stderr.contains("never here"));
    assert!(run.stderr.contains("terminated i-"), "{}", run.stderr);
    assert_nothing_left(&cloud);

    // --keep leaves the box to look into; here a package the box's apt does not know.
    let run = user.run(&attached_args(&proxy, &["--keep", "--package", "no-such-tool", "--", "true"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("error: setup failed on the box with exit status 100"), "{}", run.stderr);
    assert!(run.stderr.contains("  E: Unable to locate package no-such-tool"), "{}", run.stderr);
    assert!(run.stderr.contains("left session") && run.stderr.contains("(--keep)"), "{}", run.stderr);
    assert_eq!(live_instances(&cloud).len(), 1, "kept");
    let log = user.run(&[
        "connect",
        "last",
        "--proxy-command",
        &proxy,
        "--",
        "sh",
        "-c",
        "cat \"$EA_SETUP_DIR/setup.status\"",
    ]);
    assert_eq!(log.success().stdout, "100\n");
    user.run(&["terminate", "last"]).success();
    assert_nothing_left(&cloud);

    // A setup that never ends is given up after setup_timeout.
    user.write_config("setup_timeout = \"2s\"\n");
    let run = user.run(&attached_args(&proxy, &["--setup-script", "echo started; sleep 60", "--", "true"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("error: setup did not finish within 2s (setup_timeout)"), "{}", run.stderr);
    assert!(
        run.stderr.contains("its last lines:\n  ephemeral-admin: running the setup script\n  started"),
        "{}",
        run.stderr
    );
    assert_nothing_left(&cloud);
}

/// Random letters: gzip gains little on them.
/// A box is untrusted (issue #31): its setup log may hold escape sequences (set the terminal's
/// title, clear the screen); launch shows them escaped, both as the log streams and in the
/// failure's tail.
#[test]
fn setup_log_lines_from_the_box_show_their_escape_sequences_escaped() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let script = "printf 'title \\033]0;pwned\\007 red \\033[31mline\\n'\nprintf 'wipe \\033[2J\\233c \\302\\233c\\n' >&2\nexit 4\n";
    let run = user.run(&attached_args(&proxy, &["--setup-script", script, "--", "true"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!run.stderr.contains(['\x1b', '\x07', '\u{9b}']), "no raw ESC, BEL or CSI: {:?}", run.stderr);
    let streamed = run.stderr.find("title \\x1b]0;pwned\\x07 red \\x1b[31mline\n").expect(&run.stderr);
    let error = run.stderr.find("error: setup failed on the box with exit status 4").expect(&run.stderr);
    assert!(streamed < error, "{}", run.stderr);
    assert!(run.stderr[..error].contains("wipe \\x1b[2J\\x9bc \\u{009b}c\n"), "{}", run.stderr);
    assert!(
        run.stderr[error..].contains("\n  title \\x1b]0;pwned\\x07 red \\x1b[31mline\n"),
        "the tail: {}",
        run.stderr
    );
    assert_nothing_left(&cloud);
}

fn incompressible(len: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 80 == 79 { '\n' } else { (b'a' + (x % 26) as u8) as char }
        })
        .collect()
}

#[test]
fn user_data_above_16_kib_is_gzipped_and_refused_before_any_aws_call_when_still_too_large() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let big = write_script(&user, "big.sh", &format!(": '{}'\n", incompressible(24 * 1024)));
    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--setup", big.to_str().unwrap(), "--", "true"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("above the 16 KiB AWS accepts"), "{}", run.stderr);
    assert!(run.stderr.contains("big.sh"), "names the script: {}", run.stderr);
    assert_eq!(cloud.actions(), Vec::<String>::new(), "no AWS call at all");
    assert!(cloud.state()["instances"].as_array().unwrap().is_empty());

    // 40 KiB that compresses well: sent gzip'd, and it runs to its last line.
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!("echo 'line {i:04} of a long but repetitive setup' >/dev/null\n"));
    }
    text.push_str("echo complete > \"$HOME/big-setup\"\n");
    assert!(text.len() > 40 * 1024);
    let script = write_script(&user, "long.sh", &text);
    let args = attached_args(
        &proxy,
        &["--setup", script.to_str().unwrap(), "--", "sh", "-c", "cat \"$HOME/big-setup\""],
    );
    let run = user.run(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "complete\n");
    let sent = sent_user_data(&cloud);
    assert!(sent.starts_with(&[0x1f, 0x8b]) && sent.len() <= 16 * 1024, "gzip'd: {} bytes", sent.len());
    assert_nothing_left(&cloud);
}

#[test]
fn profile_name_picks_a_bundle_of_settings_and_an_unknown_one_lists_the_defined() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    user.write_config(
        "instance_types = [\"t3.micro\"]\n\
         setup = \"./nothing-here.sh\"\n\n\
         [profiles.db]\n\
         instance_types = [\"t3.small\"]\n\
         packages = [\"postgresql-client\"]\n\
         setup_script = \"echo from-profile\"\n\n\
         [profiles.web]\n\
         instance_types = [\"t3.medium\"]\n",
    );
    let run =
        user.run(&attached_args(&proxy, &["--profile-name", "db", "--detach", "--output", "json"])).success();
    assert!(run.stderr.contains(" (profile db): t3.small"), "the launch says which: {}", run.stderr);
    let out = run.json();
    assert_eq!(out["instance_type"], "t3.small", "{out}");
    let state = cloud.state();
    let text = state["instances"][0]["user_data"].as_str().unwrap().to_string();
    assert!(text.contains("'postgresql-client'") && text.contains("ephemeral-admin-setup"), "{text}");
    // The profile's inline script replaced the top level's script file (which does not exist).
    let script = text.split("content: ").find(|c| c.starts_with("ZWNob")).expect("the script, base64");
    assert_eq!(
        script.lines().next().unwrap(),
        base64::engine::general_purpose::STANDARD.encode("echo from-profile")
    );
    user.run(&["terminate", "last"]).success();

    let web = user.env("EPHEMERAL_ADMIN_PROFILE_NAME", "web");
    let out = launch_detached(&web, &proxy, &["--setup-script", "true"]);
    assert_eq!(out["instance_type"], "t3.medium", "from the environment: {out}");
    web.run(&["terminate", "last"]).success();

    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--profile-name", "dbx", "--detach"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("no profile \"dbx\" (from --profile-name): defined: db, web"),
        "{}",
        run.stderr
    );
    assert!(cloud.actions().is_empty(), "no AWS call: {:?}", cloud.actions());
    // Without a profile the top level applies, and its missing script file is bad input.
    let run = user.run(&attached_args(&proxy, &["--detach"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("nothing-here.sh") && run.stderr.contains("config.toml:2"), "{}", run.stderr);
    assert_nothing_left(&cloud);
}

/// Issue #31: the setup log holds whatever the packages and the script printed, so on the box
/// it is 0600 (root's there; in the simulator the runner runs as the login user), and the
/// launch still follows it to the end.
#[test]
fn the_setup_log_is_private_on_the_box_and_still_followed() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let script = write_script(&user, "prep.sh", "echo 'setup: a line only root may read'\n");
    let run =
        user.run(&attached_args(&proxy, &["--keep", "--setup", script.to_str().unwrap(), "--", "true"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("setup: a line only root may read"), "followed: {}", run.stderr);
    let stat = "stat -c %a \"$EA_SETUP_DIR/setup.log\"";
    let run = user.run(&["connect", "last", "--proxy-command", &proxy, "--", "sh", "-c", stat]);
    assert_eq!(run.success().stdout, "600\n");
    user.run(&["terminate", "last"]).success();
    assert_nothing_left(&cloud);
}
