//! Text plumbing for SSH command lines: POSIX shell quoting of an argv (SSH carries one command
//! string, which the remote login shell re-splits) and OpenSSH-style `%` expansion of a
//! ProxyCommand template.

use std::borrow::Cow;

/// Joins `argv` into one POSIX shell command line that the remote shell splits back into exactly
/// `argv`. Plain words stay as they are; anything else is single-quoted, with `'` written as
/// `'\''`. The empty string becomes `''`.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter().map(|arg| quote_word(arg)).collect::<Vec<_>>().join(" ")
}

fn quote_word(word: &str) -> Cow<'_, str> {
    // Not `=` (a leading `A=b` would be an assignment), `~` (tilde expansion), `#` (comment),
    // nor globbing, brace or other shell metacharacters.
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./:,+@%^".contains(&b);
    if !word.is_empty() && word.bytes().all(plain) {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// Expands an OpenSSH-style ProxyCommand template: `%h` host, `%p` port, `%i` instance id, `%r`
/// remote user, `%%` a literal `%`. Values are inserted as they are (like OpenSSH does); any other
/// `%x`, and a trailing `%`, are left untouched.
pub fn expand_proxy_command(template: &str, host: &str, port: u16, instance_id: &str, user: &str) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some('h') => out.push_str(host),
            Some('p') => out.push_str(&port.to_string()),
            Some('i') => out.push_str(instance_id),
            Some('r') => out.push_str(user),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => {
                out.push('%');
                continue;
            }
        }
        chars.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_words_stay_plain() {
        assert_eq!(shell_quote(&args(&["echo", "hello"])), "echo hello");
        assert_eq!(
            shell_quote(&args(&["ls", "-la", "/var/log", "a.b_c-d:1,2+3@x%y"])),
            "ls -la /var/log a.b_c-d:1,2+3@x%y"
        );
    }

    #[test]
    fn everything_else_is_single_quoted() {
        assert_eq!(shell_quote(&args(&["sh", "-c", "exit 7"])), "sh -c 'exit 7'");
        assert_eq!(shell_quote(&args(&["it's"])), r"'it'\''s'");
        assert_eq!(shell_quote(&args(&[""])), "''");
        assert_eq!(
            shell_quote(&args(&["$HOME", "`id`", "a;b", "*", "~", "#x", "A=b", "{a,b}"])),
            "'$HOME' '`id`' 'a;b' '*' '~' '#x' 'A=b' '{a,b}'"
        );
        assert_eq!(
            shell_quote(&args(&["line\nbreak", "tab\there", "naïve"])),
            "'line\nbreak' 'tab\there' 'naïve'"
        );
        assert_eq!(shell_quote(&args(&["''"])), r"''\'''\'''");
        assert_eq!(shell_quote(&[]), "");
    }

    #[test]
    fn quoted_words_survive_a_real_shell() {
        let cases =
            args(&["a b", "it's", "", "$HOME", "`id`", "\\", "\"q\"", "x\ny", "A=b", "*", "'", "''", "%^@"]);
        let mut argv = args(&["printf", "<%s>\\n"]);
        argv.extend(cases.iter().cloned());
        let out = std::process::Command::new("sh").arg("-c").arg(shell_quote(&argv)).output().unwrap();
        let expected: String = cases.iter().map(|c| format!("<{c}>\n")).collect();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    }

    #[test]
    fn proxy_command_escapes_expand_like_openssh() {
        assert_eq!(
            expand_proxy_command("ssh -W %h:%p bastion", "10.0.0.5", 22, "i-0abc", "ec2-user"),
            "ssh -W 10.0.0.5:22 bastion"
        );
        assert_eq!(
            expand_proxy_command(
                "aws ssm start-session --target %i --parameters portNumber=%p # %r 100%%",
                "h",
                2222,
                "i-0abc",
                "admin"
            ),
            "aws ssm start-session --target i-0abc --parameters portNumber=2222 # admin 100%"
        );
        assert_eq!(expand_proxy_command("%%h %x 50% %", "H", 1, "I", "R"), "%h %x 50% %");
        assert_eq!(expand_proxy_command("%h%p%i%r", "H", 1, "I", "R"), "H1IR");
        assert_eq!(expand_proxy_command("", "H", 1, "I", "R"), "");
    }
}
