//! The `-L`, `-R` and `-D` specs, parsed exactly as OpenSSH reads them, before anything else
//! happens: `[BIND_ADDR:]PORT:HOST:HOSTPORT` for `-L` and `-R`, `[BIND_ADDR:]PORT` for `-D`.
//! An IPv6 address goes in square brackets (`[::1]:8080:[fd00::5]:80`); an empty bind address
//! or `*` means every interface. Unix-socket forms and `-R [ADDR:]PORT` (a SOCKS proxy on the
//! box) are refused with a line saying so.

use std::fmt;

/// Where a listener binds: an address (`None` = the default for its side) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub addr: Option<String>,
    pub port: u16,
}

/// One `-L` or `-R`: listen at `bind`, connect to `host:port` on the other side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForward {
    pub bind: Bind,
    pub host: String,
    pub port: u16,
    /// The spec as typed, for messages.
    pub spec: String,
}

/// One `-D`: a SOCKS5 proxy listening at `bind`, connecting from the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    pub bind: Bind,
    pub spec: String,
}

/// Every forward of one `launch` or `connect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwards {
    pub local: Vec<PortForward>,
    pub remote: Vec<PortForward>,
    pub dynamic: Vec<Dynamic>,
}

impl Forwards {
    /// Parses every spec; the first bad one is the error (one line, naming the flag and form).
    pub fn parse(local: &[String], remote: &[String], dynamic: &[String]) -> Result<Forwards, String> {
        Ok(Forwards {
            local: local.iter().map(|s| parse_port_forward('L', s)).collect::<Result<_, _>>()?,
            remote: remote.iter().map(|s| parse_port_forward('R', s)).collect::<Result<_, _>>()?,
            dynamic: dynamic.iter().map(|s| parse_dynamic(s)).collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty() && self.dynamic.is_empty()
    }
}

impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr.as_deref() {
            Some(addr) if addr.contains(':') => write!(f, "[{addr}]:{}", self.port),
            Some(addr) => write!(f, "{addr}:{}", self.port),
            None => write!(f, "{}", self.port),
        }
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

const LOCAL_FORM: &str = "[LOCAL_ADDR:]LOCAL_PORT:HOST:PORT, e.g. 5432:db.internal:5432";
const REMOTE_FORM: &str = "[REMOTE_ADDR:]REMOTE_PORT:HOST:PORT, e.g. 8080:localhost:3000";
const DYNAMIC_FORM: &str = "[ADDR:]PORT, e.g. 1080";

fn parse_port_forward(flag: char, spec: &str) -> Result<PortForward, String> {
    let form = if flag == 'L' { LOCAL_FORM } else { REMOTE_FORM };
    let bad = |why: &str| format!("invalid -{flag} {spec:?}: {why}; expected {form}");
    let fields = split_fields(spec).map_err(|why| bad(&why))?;
    let (addr, listen, host, port) = match fields.as_slice() {
        [listen, host, port] => (None, listen, host, port),
        [addr, listen, host, port] => (Some(addr.as_str()), listen, host, port),
        [_, _] if flag == 'R' => {
            return Err(bad("a SOCKS proxy on the box (-R [ADDR:]PORT) is not supported"));
        }
        [_] | [_, _] if spec.contains('/') => return Err(bad("Unix socket forwarding is not supported")),
        _ => return Err(bad("wrong number of fields")),
    };
    // The box assigns a free port for `-R 0:…`, as sshd does; a local listener needs a real one.
    let listen = parse_port(listen, flag == 'R').map_err(|why| bad(&why))?;
    let port = parse_port(port, false).map_err(|why| bad(&why))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("HOST is empty or has spaces"));
    }
    Ok(PortForward {
        bind: Bind { addr: bind_addr(addr), port: listen },
        host: host.clone(),
        port,
        spec: spec.to_string(),
    })
}

fn parse_dynamic(spec: &str) -> Result<Dynamic, String> {
    let bad = |why: &str| format!("invalid -D {spec:?}: {why}; expected {DYNAMIC_FORM}");
    let fields = split_fields(spec).map_err(|why| bad(&why))?;
    let (addr, port) = match fields.as_slice() {
        [port] => (None, port),
        [addr, port] => (Some(addr.as_str()), port),
        _ => return Err(bad("wrong number of fields")),
    };
    let port = parse_port(port, false).map_err(|why| bad(&why))?;
    Ok(Dynamic { bind: Bind { addr: bind_addr(addr), port }, spec: spec.to_string() })
}

/// `*` and the empty string mean every interface, as in OpenSSH; absent means the default.
fn bind_addr(addr: Option<&str>) -> Option<String> {
    match addr {
        None => None,
        Some("" | "*") => Some(String::new()),
        Some(addr) => Some(addr.to_string()),
    }
}

fn parse_port(text: &str, zero_ok: bool) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) if !zero_ok => Err("port 0 is not a port to connect to or listen on".to_string()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("{text:?} is not a port (1 to 65535)")),
    }
}

/// Splits at `:`, keeping a `[…]` field (an IPv6 address) whole, without its brackets.
fn split_fields(spec: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut rest = spec;
    loop {
        let (field, after) = if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').ok_or("an unclosed [")?;
            let after = &inner[end + 1..];
            if !(after.is_empty() || after.starts_with(':')) {
                return Err("text after a ]".to_string());
            }
            (inner[..end].to_string(), after)
        } else {
            let end = rest.find(':').unwrap_or(rest.len());
            (rest[..end].to_string(), &rest[end..])
        };
        fields.push(field);
        match after.strip_prefix(':') {
            Some(next) => rest = next,
            None => return Ok(fields),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(spec: &str) -> Result<PortForward, String> {
        parse_port_forward('L', spec)
    }

    #[test]
    fn local_forwards_read_like_openssh() {
        let f = local("5432:db.internal:5432").unwrap();
        assert_eq!((f.bind.addr, f.bind.port, f.host.as_str(), f.port), (None, 5432, "db.internal", 5432));
        let f = local("0.0.0.0:8080:10.0.0.5:80").unwrap();
        assert_eq!(f.bind.addr.as_deref(), Some("0.0.0.0"));
        let f = local("[::1]:8080:[fd00::5]:443").unwrap();
        assert_eq!((f.bind.addr.as_deref(), f.host.as_str(), f.port), (Some("::1"), "fd00::5", 443));
        assert_eq!(local("*:8080:h:80").unwrap().bind.addr.as_deref(), Some(""));
        assert_eq!(local(":8080:h:80").unwrap().bind.addr.as_deref(), Some(""));
    }

    #[test]
    fn bad_specs_say_what_is_wrong_and_the_form() {
        for (spec, says) in [
            ("8080", "wrong number of fields"),
            ("8080:db", "wrong number of fields"),
            ("a:b:c:d:e", "wrong number of fields"),
            ("x:db:5432", "\"x\" is not a port"),
            ("8080:db:70000", "\"70000\" is not a port"),
            ("0:db:5432", "port 0"),
            ("8080::5432", "HOST is empty"),
            ("[::1:8080:h:1", "unclosed ["),
            ("/tmp/sock:/run/db.sock", "Unix socket"),
        ] {
            let err = local(spec).unwrap_err();
            assert!(err.starts_with(&format!("invalid -L {spec:?}: ")), "{err}");
            assert!(err.contains(says), "{spec}: {err}");
            assert!(err.contains("expected [LOCAL_ADDR:]LOCAL_PORT:HOST:PORT"), "{err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn remote_forwards_may_ask_the_box_for_a_port() {
        let f = parse_port_forward('R', "0:localhost:3000").unwrap();
        assert_eq!(f.bind.port, 0);
        let err = parse_port_forward('R', "1080").unwrap_err();
        assert!(err.contains("wrong number of fields"), "{err}");
        let err = parse_port_forward('R', "127.0.0.1:1080").unwrap_err();
        assert!(err.contains("SOCKS proxy on the box"), "{err}");
    }

    #[test]
    fn dynamic_forwards_take_a_port_and_maybe_an_address() {
        assert_eq!(parse_dynamic("1080").unwrap().bind, Bind { addr: None, port: 1080 });
        assert_eq!(parse_dynamic("[::1]:1080").unwrap().bind.addr.as_deref(), Some("::1"));
        assert!(parse_dynamic("1080:x").unwrap_err().contains("is not a port"));
        assert!(parse_dynamic("a:b:c").unwrap_err().contains("expected [ADDR:]PORT"));
    }

    #[test]
    fn addresses_print_with_brackets_for_ipv6() {
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(Bind { addr: Some("127.0.0.1".into()), port: 1 }.to_string(), "127.0.0.1:1");
    }
}
