//! Files to and from the box: `cp` both ways (files, `-r` trees, modes kept, byte for byte),
//! the errors a user meets (missing path, both sides local or remote, a directory without -r),
//! `launch --upload` before the command runs, and a closed stdout; and a box as untrusted input
//! (issue #31, `docs/threat-model/cp.md`): a hostile SFTP server's names, modes, links and
//! escape sequences. The box simulator's sshd runs
//! on this machine, so "remote" paths here are absolute paths in the test's own temp HOME, and
//! the box's home is the simulator's per-box home (its `$HOME`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

/// Bytes that no two offsets share a pattern in (a shifted or truncated copy shows).
fn data(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every file and directory under `root`, relative, with its mode and (for files) contents.
fn tree(root: &Path) -> Vec<(PathBuf, u32, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.push((rel, mode(&path), None));
                stack.push(path);
            } else {
                out.push((rel, mode(&path), Some(std::fs::read(&path).unwrap())));
            }
        }
    }
    out.sort();
    out
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn cp_copies_files_and_trees_both_ways_byte_for_byte_with_modes_kept() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &["--name", "files"]);
    let id = session["session_id"].as_str().unwrap().to_string();
    let local = user.home.join("local");
    let boxside = user.home.join("box-side");
    std::fs::create_dir_all(&boxside).unwrap();

    // One file up into an existing directory (keeps its name), and down again under a new name.
    let big = data(5 * 1024 * 1024 + 17, 1);
    write(&local.join("dump.bin"), &big, 0o754);
    let run = user.run(&["cp", s(&local.join("dump.bin")), &format!("files:{}/", s(&boxside))]).success();
    assert!(!run.stderr.contains("ETA"), "no progress bar off a terminal: {}", run.stderr);
    assert!(run.stderr.contains("copied 1 file"), "{}", run.stderr);
    assert!(std::fs::read(boxside.join("dump.bin")).unwrap() == big, "uploaded byte for byte");
    assert_eq!(mode(&boxside.join("dump.bin")), 0o754, "mode kept on the way up");
    std::fs::set_permissions(boxside.join("dump.bin"), std::fs::Permissions::from_mode(0o604)).unwrap();
    let down = local.join("down.bin");
    let out =
        user.run(&["cp", &format!("{id}:{}", s(&boxside.join("dump.bin"))), s(&down), "--output", "json"]);
    let out = out.success().json();
    assert_eq!(out["direction"], "download");
    assert_eq!(out["files"], 1);
    assert_eq!(out["bytes"], big.len());
    assert!(std::fs::read(&down).unwrap() == big, "downloaded byte for byte");
    assert_eq!(mode(&down), 0o604, "mode kept on the way down");

    // A tree up and down with -r: nested directories, an empty one, modes of both kinds.
    let src = local.join("conf");
    write(&src.join("a.txt"), b"alpha\n", 0o600);
    write(&src.join("sub/run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&src.join("sub/deeper/blob"), &data(300_000, 7), 0o640);
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::set_permissions(src.join("empty"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o711)).unwrap();
    user.run(&["cp", "-r", s(&src), &format!("last:{}", s(&boxside))]).success();
    assert_eq!(tree(&boxside.join("conf")), tree(&src), "the tree arrived as it is here");
    let back = local.join("conf-back");
    user.run(&["cp", "-r", &format!("files:{}", s(&boxside.join("conf"))), s(&back)]).success();
    assert_eq!(tree(&back), tree(&src), "and came back the same");

    // `last:` with a relative path is the login user's home on the box.
    write(&local.join("note.txt"), b"in home\n", 0o644);
    user.run(&["cp", s(&local.join("note.txt")), "last:"]).success();
    let run = user.run(&["connect", "last", "--", "sh", "-c", "cat \"$HOME/note.txt\""]).success();
    assert_eq!(run.stdout, "in home\n");
    user.run(&["cp", "last:note.txt", s(&local.join("note-back.txt"))]).success();
    assert_eq!(std::fs::read(local.join("note-back.txt")).unwrap(), b"in home\n");

    // On a terminal (util-linux `script` gives cp one), a bar shows bytes, rate and ETA.
    let shown = format!(
        "{} cp {} files:{}/on-a-tty.bin",
        env!("CARGO_BIN_EXE_ephemeral-admin"),
        s(&local.join("dump.bin")),
        s(&boxside)
    );
    let out = user.wrapper("script").args(["-qfec", &shown, "/dev/null"]).output().unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    assert!(
        terminal.contains("/5.00 MiB") && terminal.contains("B/s") && terminal.contains("ETA"),
        "a bar: {terminal}"
    );
    assert!(std::fs::read(boxside.join("on-a-tty.bin")).unwrap() == big);

    // A directory without -r is bad input, before anything is contacted.
    let run = user.run(&["cp", s(&src), "last:/tmp/"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("pass -r"), "{}", run.stderr);

    user.run(&["terminate", "files"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn cp_errors_name_the_path_and_what_to_do() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap().to_string();
    let missing = user.home.join("box-side/no-such-file");
    let target = user.home.join("out.bin");
    let run = user.run(&["cp", &format!("{id}:{}", s(&missing)), s(&target)]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {}", run.stderr);
    let line = errors[0];
    assert!(line.contains(&format!("{id}:{}", s(&missing))), "names the path: {line}");
    assert!(line.contains("no such file or directory on the box"), "{line}");
    assert!(line.contains("ls -la"), "says what to do: {line}");
    assert!(!target.exists(), "nothing made locally");

    // One bad source among good ones: the good ones arrive, the exit is still 1.
    let good = user.home.join("good.txt");
    write(&good, b"ok\n", 0o644);
    let into = user.home.join("into");
    std::fs::create_dir_all(&into).unwrap();
    let run = user.run(&["cp", &format!("{id}:{}", s(&good)), &format!("{id}:{}", s(&missing)), s(&into)]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(std::fs::read(into.join("good.txt")).unwrap(), b"ok\n");

    // A box path under a regular file: nothing can be made there.
    let run = user.run(&["cp", s(&good), &format!("{id}:{}/sub/x", s(&good))]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(&format!("{id}:{}/sub/x", s(&good))), "{}", run.stderr);

    // Input that cannot mean a copy: exit 2, one line.
    for (args, says) in [
        (vec!["cp", "a", "b"], "both sides are on this machine"),
        (vec!["cp", "last:a", "last:b"], "both sides are on boxes"),
        (vec!["cp", "Bad_Name:x", "."], "./Bad_Name:x"),
    ] {
        let run = user.run(&args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
    user.run(&["terminate", &id]).success();
    assert_nothing_left(&cloud);
}

/// A pipe whose reader is closed before the program writes: EPIPE on the first write.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe {
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    }
}

#[test]
fn cp_with_a_closed_stdout_still_copies_and_exits_quietly() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap().to_string();
    let file = user.home.join("payload.bin");
    let bytes = data(200_000, 3);
    write(&file, &bytes, 0o644);
    let target = user.home.join("arrived.bin");
    for format in ["json", "text"] {
        let _ = std::fs::remove_file(&target);
        let out = user
            .command(&["cp", s(&file), &format!("{id}:{}", s(&target)), "--output", format])
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{format}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(std::fs::read(&target).unwrap() == bytes, "{format}: copied anyway");
    }
    user.run(&["terminate", &id]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn launch_upload_puts_files_on_the_box_before_the_command_runs() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let script = user.home.join("work/fix.sh");
    write(&script, b"#!/bin/sh\necho \"fixed $1\"\n", 0o750);
    let dir = user.home.join("work/conf");
    write(&dir.join("app.conf"), b"port = 5432\n", 0o600);
    let elsewhere = user.home.join("box-side/data.txt");
    std::fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    let payload = user.home.join("work/data.txt");
    write(&payload, b"payload\n", 0o644);

    // The command checks that everything is there, with its mode, before anything else.
    let upload_payload = format!("{}:{}", s(&payload), s(&elsewhere));
    let check =
        "test -x \"$HOME/fix.sh\" && test -f \"$HOME/conf/app.conf\" && \"$HOME/fix.sh\" now && cat \"$1\"";
    let args = attached_args(
        &proxy,
        &[
            "--upload",
            s(&script),
            "--upload",
            s(&dir),
            "--upload",
            &upload_payload,
            "--",
            "sh",
            "-c",
            check,
            "sh",
            s(&elsewhere),
        ],
    );
    let run = user.run(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, "fixed now\npayload\n");
    assert!(run.stderr.contains("uploaded 3 files"), "{}", run.stderr);
    assert_nothing_left(&cloud);

    // An upload that fails fails the launch: the command never runs, and the box goes.
    let marker = user.home.join("ran");
    let bad = format!("{}:{}/missing-dir/data.txt", s(&payload), s(&user.home));
    let touch = format!("touch {}", s(&marker));
    let run = user.run(&attached_args(&proxy, &["--upload", &bad, "--", "sh", "-c", &touch]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("--upload failed") && run.stderr.contains("missing-dir/data.txt"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists(), "the command did not run");
    assert_nothing_left(&cloud);

    // With --detach: copied, then the box is left to the user.
    let detached = user.home.join("box-side/detached.sh");
    let upload = format!("{}:{}", s(&script), s(&detached));
    let out = launch_detached(&user, &proxy, &["--upload", &upload]);
    assert_eq!(std::fs::read(&detached).unwrap(), std::fs::read(&script).unwrap());
    assert_eq!(mode(&detached), 0o750);
    user.run(&["terminate", out["session_id"].as_str().unwrap()]).success();
    assert_nothing_left(&cloud);

    // A LOCAL that does not exist: exit 2 before any AWS call.
    cloud.clear_log();
    let run = user.run(&attached_args(&proxy, &["--upload", "/no/such/file", "--", "true"]));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("/no/such/file"), "{}", run.stderr);
    assert!(cloud.actions().is_empty(), "no AWS call: {:?}", cloud.actions());
}

// ---- A box is untrusted input (issue #31): its SFTP server is boxsim's hostile_sftp.py, which
// lists names that climb out, setuid modes, a symlink to /etc and escape sequences.

/// A detached box whose SFTP server lies (box-config `sftp: hostile`), named `hostile`.
fn hostile_box(cloud: &LocalCloud, user: &User) {
    cloud.control("PUT", "box-config", Some(serde_json::json!({ "sftp": "hostile" })));
    launch_detached(user, &proxy(cloud), &["--name", "hostile"]);
}

/// `cp ARGS` with the umask `mask`: exit code and stderr.
fn cp_with_umask(user: &User, args: &[&str], mask: libc::mode_t) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let mut command = user.command(&[&["cp"][..], args].concat());
    // SAFETY: umask is async-signal-safe and touches nothing but the child's own state.
    unsafe {
        command.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        });
    }
    let out = command.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn errors(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    names
}

#[test]
fn cp_refuses_box_names_that_climb_out_empty_nul_long_or_listed_twice() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    hostile_box(&cloud, &user);
    let here = user.home.join("dl");
    for (source, bad) in
        [("/evil/dotdot/.", "\"../escape-dotdot.txt\""), ("/evil/slash/.", "\"x/../../escape-slash.txt\"")]
    {
        let dest = here.join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let (code, stderr) = cp_with_umask(&user, &["-r", &format!("hostile:{source}"), s(&dest)], 0o022);
        assert_eq!(code, 1, "{stderr}");
        let lines = errors(&stderr);
        assert_eq!(lines.len(), 1, "one error line: {stderr}");
        assert!(lines[0].contains(bad) && lines[0].contains("refused"), "names the entry: {stderr}");
        assert_eq!(listing(&here), ["dest"], "nothing written outside the destination: {stderr}");
        assert_eq!(std::fs::read(dest.join("ok.txt")).unwrap(), b"ok\n", "the good entries arrive");
        std::fs::remove_dir_all(&dest).unwrap();
    }

    // `.` and `..` listed with file attributes are skipped (every server lists them); an empty
    // name, a NUL, 300 bytes, a name listed twice and `a/b` are refused, each on its own line.
    let dest = here.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/names", s(&dest)], 0o022);
    assert_eq!(code, 1, "{stderr}");
    for says in ["\"\"", "\"nul\\x00.txt\"", "longer than 255 bytes", "\"twice\"", "listed twice", "\"a/b\""]
    {
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
    assert_eq!(listing(&here), ["dest"], "{stderr}");
    assert_eq!(listing(&dest.join("names")), ["a", "ok.txt"], "only the good entries: {stderr}");
    assert!(listing(&dest.join("names/a")).is_empty(), "nothing smuggled into a/: {stderr}");

    // A file that turns out a directory when opened, and the other way round: each fails on its
    // own line, nothing lands outside.
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/flip", s(&dest)], 0o022);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("hostile:/evil/flip/flip:") && stderr.contains("hostile:/evil/flip/flop:"),
        "{stderr}"
    );
    assert_eq!(listing(&here), ["dest"], "{stderr}");
    assert_eq!(std::fs::read(dest.join("flip/ok.txt")).unwrap(), b"ok\n");
    assert!(!dest.join("flip/flip").exists(), "{stderr}");
    user.run(&["terminate", "hostile"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn cp_keeps_the_destination_mode_applies_the_umask_and_drops_setuid_setgid_sticky() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    hostile_box(&cloud, &user);
    let dest = user.home.join("modes");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o750)).unwrap();
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/modes/.", s(&dest)], 0o027);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mode(&dest), 0o750, "the existing destination keeps its mode (the box's is 1777)");
    for (name, want) in
        [("suid", 0o750), ("sgid", 0o750), ("world", 0o640), ("sticky", 0o750), ("sticky/inner", 0o640)]
    {
        assert_eq!(mode(&dest.join(name)), want, "{name}: umask 027, no setuid/setgid/sticky");
    }
    let one = user.home.join("one-suid");
    let (code, stderr) = cp_with_umask(&user, &["hostile:/evil/modes/suid", s(&one)], 0o022);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mode(&one), 0o755, "a single file too");

    // --preserve keeps the box's modes (the sticky bit, no umask) but never setuid or setgid.
    let kept = user.home.join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, stderr) =
        cp_with_umask(&user, &["-r", "--preserve", "hostile:/evil/modes/.", s(&kept)], 0o077);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mode(&kept), 0o700, "even with --preserve");
    for (name, want) in
        [("suid", 0o755), ("sgid", 0o755), ("world", 0o666), ("sticky", 0o1777), ("sticky/inner", 0o644)]
    {
        assert_eq!(mode(&kept.join(name)), want, "{name} with --preserve");
    }
    user.run(&["terminate", "hostile"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn cp_never_writes_through_a_symlink_in_the_destination() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    hostile_box(&cloud, &user);
    let outside = user.home.join("outside");
    write(&outside.join("keep.txt"), b"mine\n", 0o644);
    let dest = user.home.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("keep.txt"), dest.join("f.txt")).unwrap();
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/plain/.", s(&dest)], 0o022);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(errors(&stderr).len(), 3, "f.txt, sub, and the summary: {stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read(outside.join("keep.txt")).unwrap(), b"mine\n", "not written through");
    assert_eq!(listing(&outside), ["keep.txt"], "nothing made through the link: {stderr}");
    assert!(std::fs::symlink_metadata(dest.join("sub")).unwrap().file_type().is_symlink());

    // The box's own symlink (etc -> /etc) is followed on the box: a real directory arrives here.
    let copy = user.home.join("linked");
    std::fs::create_dir_all(&copy).unwrap();
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/link", s(&copy)], 0o022);
    assert_eq!(code, 0, "{stderr}");
    let etc = copy.join("link/etc");
    assert!(std::fs::symlink_metadata(&etc).unwrap().is_dir(), "a directory, not a link");
    assert_eq!(std::fs::read(etc.join("passwd")).unwrap(), b"box-root:x:0:0\n");
    user.run(&["terminate", "hostile"]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn cp_shows_box_names_and_messages_with_their_escape_sequences_escaped() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    hostile_box(&cloud, &user);
    let dest = user.home.join("esc");
    std::fs::create_dir_all(&dest).unwrap();
    let (code, stderr) = cp_with_umask(&user, &["-r", "hostile:/evil/esc", s(&dest)], 0o022);
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains(['\x1b', '\x07']), "no raw ESC or BEL reaches the terminal: {stderr:?}");
    assert!(stderr.contains("\\x1b]0;pwned\\x07\\x1b[31mred.txt"), "the name, escaped: {stderr}");
    assert!(stderr.contains("\\x1b[2J"), "the box's message, escaped: {stderr}");
    assert_eq!(std::fs::read(dest.join("esc/ok.txt")).unwrap(), b"ok\n");
    user.run(&["terminate", "hostile"]).success();
    assert_nothing_left(&cloud);
}

/// Up to the box, the same rules: the box's existing directory keeps its mode, setuid/setgid/
/// sticky are not copied (the box's SFTP server applies its own umask), `--preserve` keeps the
/// sticky bit but never setuid or setgid.
#[test]
fn cp_up_keeps_the_box_directory_mode_and_drops_setuid_setgid_sticky() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    launch_detached(&user, &proxy(&cloud), &["--name", "up"]);
    let up = user.home.join("up");
    write(&up.join("suid"), b"#!/bin/sh\n", 0o4755);
    write(&up.join("plain"), b"p\n", 0o640);
    write(&up.join("sticky/inner"), b"i\n", 0o644);
    std::fs::set_permissions(up.join("sticky"), std::fs::Permissions::from_mode(0o1755)).unwrap();
    std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (preserve, into, sticky) in [(false, "into", 0o755), (true, "into-kept", 0o1755)] {
        let into = user.home.join("box-side").join(into);
        std::fs::create_dir_all(&into).unwrap();
        std::fs::set_permissions(&into, std::fs::Permissions::from_mode(0o750)).unwrap();
        let source = format!("{}/.", s(&up));
        let target = format!("up:{}", s(&into));
        let args: Vec<&str> =
            if preserve { vec!["-r", "-p", &source, &target] } else { vec!["-r", &source, &target] };
        let (code, stderr) = cp_with_umask(&user, &args, 0o022);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(mode(&into), 0o750, "the box's directory keeps its mode (preserve: {preserve})");
        assert_eq!(mode(&into.join("suid")), 0o755, "no setuid on the box (preserve: {preserve})");
        assert_eq!(mode(&into.join("plain")), 0o640);
        assert_eq!(mode(&into.join("sticky")), sticky, "preserve: {preserve}");
        assert_eq!(std::fs::read(into.join("sticky/inner")).unwrap(), b"i\n");
    }
    user.run(&["terminate", "up"]).success();
    assert_nothing_left(&cloud);
}
