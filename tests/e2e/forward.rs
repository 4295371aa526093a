//! Port and agent forwarding on the session's pinned connection: `-L` and `-D` reach a service
//! only the box can reach (the box simulator's private service answers its secret token only to
//! the box's own processes), 50 connections at once through one `-L`, `-R` lets the box reach a
//! listener here, `-A` lets the box use a real ssh-agent, every forward ends with the session,
//! and bad specs are refused before any AWS call.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lifecycle::wait_until;
use crate::session::{assert_nothing_left, attached_args, launch_detached, proxy};
use crate::support::{LocalCloud, User};

const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// A CLI run in the background, its stderr collected line by line.
struct Background {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Background {
    fn start(user: &User, args: &[&str]) -> Background {
        let mut child = user.command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Background { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for a stderr line containing `text`; returns it.
    fn wait_line(&mut self, text: &str) -> String {
        let mut found = None;
        wait_until(&format!("a line with {text:?}"), Duration::from_secs(60), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the CLI exited ({status}) before saying {text:?}:\n{}", self.stderr());
            }
            found = self.stderr.lock().unwrap().iter().find(|l| l.contains(text)).cloned();
            found.is_some()
        });
        found.unwrap()
    }

    /// Ctrl-C, then the exit code and everything it said.
    fn interrupt(mut self) -> (i32, String) {
        let ok = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (status.code().unwrap_or(-1), self.stderr())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over an open connection; the whole response.
fn http_over(mut stream: TcpStream, path: &str) -> String {
    stream.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: console\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn http_get(port: u16, path: &str) -> String {
    http_over(TcpStream::connect(("127.0.0.1", port)).unwrap(), path)
}

/// A SOCKS5 target, as the three address types say it.
enum Target<'a> {
    V4(Ipv4Addr, u16),
    Name(&'a str, u16),
    V6(Ipv6Addr, u16),
}

/// A minimal SOCKS5 client (no auth, CONNECT): the open stream, or the server's reply code.
fn socks_connect(proxy_port: u16, target: Target) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut chosen = [0u8; 2];
    s.read_exact(&mut chosen).unwrap();
    assert_eq!(chosen, [5, 0], "no authentication");
    let mut request = vec![5, 1, 0];
    let port = match target {
        Target::V4(ip, port) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
            port
        }
        Target::Name(name, port) => {
            request.extend_from_slice(&[3, name.len() as u8]);
            request.extend_from_slice(name.as_bytes());
            port
        }
        Target::V6(ip, port) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
            port
        }
    };
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!((reply[0], reply[3]), (5, 1), "a SOCKS5 reply: {reply:?}");
    if reply[1] == 0 { Ok(s) } else { Err(reply[1]) }
}

/// The box's private service: its addresses, read on the box, and its token, from the simulator.
struct Private {
    v4: SocketAddr,
    v6: Option<SocketAddr>,
    token: String,
}

fn private_service(cloud: &LocalCloud, user: &User, session: &serde_json::Value) -> Private {
    let id = session["session_id"].as_str().unwrap();
    let run = user.run(&["connect", id, "--", "sh", "-c", "cat \"$HOME/private-service\""]).success();
    let addrs: Vec<SocketAddr> = run.stdout.lines().map(|l| l.parse().unwrap()).collect();
    let instance = session["instance_id"].as_str().unwrap();
    let token = cloud.control("GET", &format!("box/{instance}"), None)["private_service_token"]
        .as_str()
        .expect("the box runs a private service")
        .to_string();
    Private {
        v4: *addrs.iter().find(|a| a.is_ipv4()).expect("an IPv4 address"),
        v6: addrs.iter().find(|a| a.is_ipv6()).copied(),
        token,
    }
}

fn answered(response: &str, private: &Private, path: &str) -> bool {
    response.starts_with("HTTP/1.0 200")
        && response.contains(&format!("token={}\n", private.token))
        && response.contains(&format!("path={path}\n"))
}

#[test]
fn bad_forwards_are_exit_2_before_any_aws_call() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let taken_spec = format!("{taken_port}:db:5432");
    for (args, says) in [
        (vec!["launch", "--my-ip", "203.0.113.7", "-L", "8080:db"], "invalid -L \"8080:db\""),
        (vec!["launch", "--my-ip", "203.0.113.7", "-L", "x:db:5432"], "\"x\" is not a port"),
        (vec!["connect", "last", "-L", "8080:db:70000"], "\"70000\" is not a port"),
        (vec!["connect", "last", "-R", "1080"], "invalid -R \"1080\""),
        (vec!["connect", "last", "-D", "a:b:c"], "invalid -D \"a:b:c\""),
        (vec!["launch", "--detach", "-L", "8080:db:5432"], "--detach does not connect"),
        (vec!["connect", "last", "-N", "--", "ls"], "-N means no command"),
        (vec!["connect", "last", "-A"], "SSH_AUTH_SOCK is not set"),
        (vec!["connect", "last", "-L", &taken_spec], "cannot listen on 127.0.0.1:"),
    ] {
        cloud.clear_log();
        let run = user.run(&args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.starts_with("error: ") && run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {}", run.stderr);
        assert!(cloud.calls().is_empty(), "{args:?} called AWS: {:?}", cloud.actions());
    }
}

#[test]
fn local_and_socks_forwards_reach_a_service_only_the_box_can_reach_and_end_with_the_session() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();
    let private = private_service(&cloud, &user, &session);
    // From here, the service turns us away: only the box gets the token.
    let direct = http_over(TcpStream::connect(private.v4).unwrap(), "/direct");
    assert!(direct.starts_with("HTTP/1.0 403") && !direct.contains(&private.token), "{direct}");

    let (local, socks) = (free_port(), free_port());
    let forward = format!("{local}:{}:{}", private.v4.ip(), private.v4.port());
    let mut tunnel =
        Background::start(&user, &["connect", id, "-N", "-L", &forward, "-D", &socks.to_string()]);
    tunnel.wait_line("SOCKS5 proxy on 127.0.0.1:");
    let line = tunnel.wait_line(&format!("forwarding 127.0.0.1:{local} to {}", private.v4));
    assert!(line.contains("as the box sees it"), "{line}");
    assert!(answered(&http_get(local, "/one"), &private, "/one"));

    // 50 connections open at once through the one forward: each request is left unfinished until
    // all 50 are connected, so none is answered (and closed) before the last one opens.
    let open: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut stream = TcpStream::connect(("127.0.0.1", local)).unwrap();
            write!(stream, "GET /conn-{i} HTTP/1.0\r\nHost: console\r\n").unwrap();
            stream
        })
        .collect();
    let clients: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
                stream.write_all(b"\r\n").unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).unwrap();
                (i, response)
            })
        })
        .collect();
    for client in clients {
        let (i, response) = client.join().unwrap();
        assert!(answered(&response, &private, &format!("/conn-{i}")), "connection {i}: {response}");
    }

    // SOCKS5 with every address type; a domain name is resolved on the box.
    let (v4, port) = match private.v4 {
        SocketAddr::V4(a) => (*a.ip(), a.port()),
        _ => unreachable!(),
    };
    let through = socks_connect(socks, Target::V4(v4, port)).unwrap();
    assert!(answered(&http_over(through, "/socks-v4"), &private, "/socks-v4"));
    let name = v4.to_string();
    let through = socks_connect(socks, Target::Name(&name, port)).unwrap();
    assert!(answered(&http_over(through, "/socks-name"), &private, "/socks-name"));
    if let Some(SocketAddr::V6(v6)) = private.v6 {
        let through = socks_connect(socks, Target::V6(*v6.ip(), v6.port())).unwrap();
        assert!(answered(&http_over(through, "/socks-v6"), &private, "/socks-v6"));
    }
    // Nothing listens there on the box: the proxy says so.
    assert_eq!(socks_connect(socks, Target::V4(v4, free_port())).unwrap_err(), 5, "connection refused");
    // A browser's way: curl resolving names through the proxy.
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--socks5-hostname", &format!("127.0.0.1:{socks}")])
        .arg(format!("http://{}/console", private.v4))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(body.contains(&format!("token={}", private.token)) && body.contains("path=/console"), "{body}");

    let (code, stderr) = tunnel.interrupt();
    assert_eq!(code, 130, "{stderr}");
    // Ctrl-C is how -N ends: said as what happened, not as an error.
    assert!(stderr.contains("stopped forwarding (interrupted)") && !stderr.contains("error:"), "{stderr}");
    assert!(refused(local) && refused(socks), "the listeners close with the session");
    let status = user.run(&["status", id, "--output", "json"]).success().json();
    assert_eq!(status["state"], "running", "connect -N leaves the session running");
    user.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
}

#[test]
fn remote_forwards_let_the_box_reach_a_listener_here_and_launch_forwards_end_with_teardown() {
    let cloud = LocalCloud::start();
    let user = User::new(&cloud);
    let proxy = proxy(&cloud);
    let secret = format!("local-secret-{}", std::process::id());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().port();
    let answer = format!("{secret}\n");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.write_all(answer.as_bytes());
        }
    });

    // A port the box cannot listen on (taken there): one line, exit 1, and the box is gone.
    // (sshd listens on every loopback address of the box, so take the port on both.)
    let taken = (0..20)
        .find_map(|_| {
            let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
            let v6 = TcpListener::bind(("::1", v4.local_addr().unwrap().port())).ok()?;
            Some((v4, v6))
        })
        .expect("a port free on both loopbacks");
    let spec = format!("{}:127.0.0.1:{target}", taken.0.local_addr().unwrap().port());
    let run = user.run(&attached_args(&proxy, &["-R", &spec, "--", "true"]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(&format!("error: the box refused -R {spec}")), "{}", run.stderr);
    assert_nothing_left(&cloud);
    drop(taken);

    // launch -R: the box's command reaches our listener through the port the box listens on.
    let on_box = free_port();
    let fetch = format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {on_box})); print(s.makefile().readline().strip())"
    );
    let spec = format!("{on_box}:127.0.0.1:{target}");
    let run = user.run(&attached_args(&proxy, &["-R", &spec, "--", "python3", "-c", &fetch]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), secret);
    assert!(
        run.stderr.contains(&format!("forwarding localhost:{on_box} on the box to 127.0.0.1:{target} here")),
        "{}",
        run.stderr
    );
    assert!(refused(on_box), "the box stops listening when the session ends");
    assert_nothing_left(&cloud);

    // launch -N -R 0 -D: the box picks the port; Ctrl-C ends the forwards and the session.
    let socks = free_port();
    let spec = format!("0:127.0.0.1:{target}");
    let mut launch =
        Background::start(&user, &attached_args(&proxy, &["-N", "-R", &spec, "-D", &socks.to_string()]));
    let line = launch.wait_line("on the box to 127.0.0.1:");
    let picked: u16 = line
        .strip_prefix("forwarding localhost:")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("the port the box picked: {line}"));
    assert_ne!(picked, 0);
    launch.wait_line("no shell (-N)");
    let mut reply = String::new();
    BufReader::new(TcpStream::connect(("127.0.0.1", picked)).unwrap()).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim(), secret, "through the port the box picked");
    let through = socks_connect(socks, Target::V4(Ipv4Addr::LOCALHOST, target)).unwrap();
    let mut reply = String::new();
    BufReader::new(through).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim(), secret, "through -D");
    let (code, stderr) = launch.interrupt();
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("the session was torn down"), "{stderr}");
    assert!(refused(picked) && refused(socks), "every forward ends with the session");
    assert_nothing_left(&cloud);
}

#[test]
fn agent_forwarding_lets_the_box_use_the_local_agent_and_says_so_once() {
    let dir = std::env::temp_dir().join(format!("ea-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("id_ed25519");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "forward-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success());
    let listed = Command::new("ssh-keygen").arg("-lf").arg(key.with_extension("pub")).output().unwrap();
    let fingerprint =
        String::from_utf8(listed.stdout).unwrap().split_whitespace().nth(1).unwrap().to_string();
    let socket = dir.join("agent.sock");
    // Killed however the test ends: a foreground agent would outlive it and hold its pipes.
    let _agent = Background {
        child: Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        stderr: Arc::default(),
    };
    wait_until("the ssh-agent socket", Duration::from_secs(10), || socket.exists());
    let added = Command::new("ssh-add").arg(&key).env("SSH_AUTH_SOCK", &socket).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));

    let cloud = LocalCloud::start();
    let user = User::new(&cloud).env("SSH_AUTH_SOCK", socket.to_str().unwrap());
    let proxy = proxy(&cloud);
    let session = launch_detached(&user, &proxy, &[]);
    let id = session["session_id"].as_str().unwrap();

    let run = user.run(&["connect", id, "-A", "--", "ssh-add", "-l"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains(&fingerprint), "the box sees the key: {}", run.stdout);
    let warned: Vec<&str> = run.stderr.lines().filter(|l| l.contains("ssh-agent")).collect();
    assert_eq!(warned.len(), 1, "{}", run.stderr);
    assert!(
        warned[0].starts_with("warning: ") && warned[0].contains("root on the box can use it"),
        "{}",
        warned[0]
    );

    // Off by default: the box has no agent.
    let run = user.run(&["connect", id, "--", "ssh-add", "-l"]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(!run.stdout.contains(&fingerprint));
    assert!(!run.stderr.contains("ssh-agent"), "no warning when off: {}", run.stderr);

    // On from the config.
    user.write_config("forward_agent = true\n");
    let run = user.run(&["connect", id, "--", "ssh-add", "-l"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains(&fingerprint), "{}", run.stdout);
    assert!(run.stderr.contains("root on the box can use it"), "{}", run.stderr);

    user.run(&["terminate", id]).success();
    assert_nothing_left(&cloud);
    let _ = std::fs::remove_dir_all(&dir);
}
