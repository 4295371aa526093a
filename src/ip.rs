//! The caller's public address, as AWS will see the SSH connection come from.
//!
//! Asks several echo services at once and takes the first answer that parses as an IP address;
//! a garbage answer, an error or a timeout from one service never wins over a good one.

use std::net::IpAddr;
use std::time::Duration;

use futures::future::select_ok;
use ipnet::IpNet;

/// IPv4 answers: SSH to the box's public IPv4 address leaves from the caller's IPv4 address.
pub const DEFAULT_SERVICES: &[&str] =
    &["https://api.ipify.org", "https://checkip.amazonaws.com", "https://ipv4.icanhazip.com"];

/// How long one service may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot detect your public IP ({why}); pass it yourself with --my-ip 203.0.113.7/32 (or set my_ip in the config)"
)]
pub struct DetectError {
    why: String,
}

/// The caller's address as a host network: /32 for IPv4, /128 for IPv6.
pub async fn detect(services: &[String], timeout: Duration) -> Result<IpNet, DetectError> {
    if services.is_empty() {
        return Err(DetectError { why: "no IP echo service configured".into() });
    }
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("ephemeral-admin/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DetectError { why: e.to_string() })?;
    let asks = services.iter().map(|url| Box::pin(ask(&client, url)));
    match select_ok(asks).await {
        Ok((addr, _)) => Ok(IpNet::from(addr)),
        Err(why) => Err(DetectError { why }),
    }
}

async fn ask(client: &reqwest::Client, url: &str) -> Result<IpAddr, String> {
    let response = client.get(url).send().await.map_err(|e| format!("{url}: {}", describe(e)))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered HTTP {}", response.status().as_u16()));
    }
    let body = response.text().await.map_err(|e| format!("{url}: {}", describe(e)))?;
    let text = body.trim();
    text.parse::<IpAddr>().map_err(|_| {
        let shown: String = text.chars().take(40).collect();
        format!("{url} answered {shown:?}, not an IP address")
    })
}

fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() { "timed out".into() } else { e.without_url().to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-trick HTTP server on loopback: answers every request with `body` after `delay`.
    async fn echo_service(body: &'static str, delay: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_good_answer_becomes_a_host_cidr() {
        let good = echo_service("203.0.113.7\n", Duration::ZERO).await;
        assert_eq!(detect(&[good], TIMEOUT).await.unwrap().to_string(), "203.0.113.7/32");
    }

    #[tokio::test]
    async fn ipv6_callers_get_a_128() {
        let v6 = echo_service("2001:db8::7", Duration::ZERO).await;
        assert_eq!(detect(&[v6], TIMEOUT).await.unwrap().to_string(), "2001:db8::7/128");
    }

    #[tokio::test]
    async fn garbage_and_timeouts_lose_to_a_good_answer() {
        let garbage = echo_service("<html>blocked</html>", Duration::ZERO).await;
        let slow = echo_service("198.51.100.1", Duration::from_secs(10)).await;
        let good = echo_service("203.0.113.9", Duration::from_millis(200)).await;
        let found = detect(&[garbage, slow, good], Duration::from_secs(2)).await.unwrap();
        assert_eq!(found.to_string(), "203.0.113.9/32");
    }

    #[tokio::test]
    async fn nothing_answers_names_the_flag() {
        let garbage = echo_service("nope", Duration::ZERO).await;
        let slow = echo_service("198.51.100.1", Duration::from_secs(10)).await;
        let e = detect(&[garbage, slow], Duration::from_millis(300)).await.unwrap_err().to_string();
        assert!(e.starts_with("cannot detect your public IP"), "{e}");
        assert!(e.contains("--my-ip"), "{e}");
    }
}
