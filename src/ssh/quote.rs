//! Text plumbing for SSH command lines: POSIX shell quoting of an argv (SSH carries one command
//! string, which the remote login shell re-splits) and OpenSSH-style `%` expansion of a
//! ProxyCommand template. This is the one place a string from data (a flag, a setting, a record)
//! becomes shell text: every command line the tool hands to `sh -c`, to the box's login shell or
//! to an ssh-config `ProxyCommand` is built from these functions.

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

/// One word of a ProxyCommand template: shell-quoted like [`shell_quote`], with every `%` doubled so
/// that neither OpenSSH nor [`expand_proxy_command`] takes it for a `%`-token.
pub fn proxy_word(word: &str) -> String {
    quote_word(word).replace('%', "%%")
}

/// A ProxyCommand template from `words`: data words quoted by [`proxy_word`], [`ProxyWord::Token`]s
/// (like `%i`, or `portNumber=%p`) kept as they are for the expansion.
pub fn proxy_template(words: &[ProxyWord<'_>]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| match w {
            ProxyWord::Data(text) => proxy_word(text),
            ProxyWord::Token(text) => (*text).to_string(),
        })
        .collect();
    quoted.join(" ")
}

/// A word of a [`proxy_template`].
pub enum ProxyWord<'a> {
    /// Text from data: quoted, `%` doubled.
    Data(&'a str),
    /// The template's own text with `%`-tokens (a constant of the program, never data).
    Token(&'static str),
}

/// Expands an OpenSSH-style ProxyCommand template: `%h` host, `%p` port, `%i` instance id, `%r`
/// remote user, `%%` a literal `%`. Each value is inserted shell-quoted (a plain value, like an
/// address or an instance id, is unchanged), so no value can add shell syntax to the command;
/// any other `%x`, and a trailing `%`, are left untouched.
pub fn expand_proxy_command(template: &str, host: &str, port: u16, instance_id: &str, user: &str) -> String {
    expand(template, |token| match token {
        'h' => Some(quote_word(host).into_owned()),
        'p' => Some(port.to_string()),
        'i' => Some(quote_word(instance_id).into_owned()),
        'r' => Some(quote_word(user).into_owned()),
        '%' => Some("%".to_string()),
        _ => None,
    })
}

/// Expands only `%i` (the instance id, which OpenSSH does not know), for a template OpenSSH
/// expands the rest of: the id goes in as a [`proxy_word`], and every other `%x` (`%%` included)
/// stays for OpenSSH.
pub fn expand_instance_token(template: &str, instance_id: &str) -> String {
    expand(template, |token| match token {
        'i' => Some(proxy_word(instance_id)),
        _ => None,
    })
}

/// One left-to-right pass over `template`: `%x` becomes `value(x)`, or stays as it is when that
/// is `None`; a trailing `%` stays.
fn expand(template: &str, value: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(token) => match value(token) {
                Some(text) => out.push_str(&text),
                None => {
                    out.push('%');
                    out.push(token);
                }
            },
            None => out.push('%'),
        }
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
