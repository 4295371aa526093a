//! The SOCKS5 side of `-D` (RFC 1928): no authentication, CONNECT only, to an IPv4 address, a
//! domain name (resolved on the box, so private DNS names work) or an IPv6 address.

use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;

/// RFC 1928 reply codes.
pub const SUCCEEDED: u8 = 0;
pub const GENERAL_FAILURE: u8 = 1;
pub const NOT_ALLOWED: u8 = 2;
pub const HOST_UNREACHABLE: u8 = 4;
pub const CONNECTION_REFUSED: u8 = 5;
const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;

/// Reads the greeting and the request; answers what it cannot serve itself and returns the
/// target to CONNECT to. The caller sends [`reply`] once it knows whether that worked.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(String, u16), String> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.map_err(|e| format!("reading the greeting: {e}"))?;
    if head[0] != VERSION {
        return Err(format!("not SOCKS5 (version byte {})", head[0]));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await.map_err(|e| format!("reading the methods: {e}"))?;
    if !methods.contains(&NO_AUTH) {
        let _ = stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await;
        return Err("the client offers no unauthenticated method".to_string());
    }
    stream.write_all(&[VERSION, NO_AUTH]).await.map_err(|e| e.to_string())?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await.map_err(|e| format!("reading the request: {e}"))?;
    if request[0] != VERSION {
        return Err(format!("request version {} is not SOCKS5", request[0]));
    }
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await.map_err(|e| e.to_string())?;
            Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let len = stream.read_u8().await.map_err(|e| e.to_string())?;
            let mut name = vec![0u8; usize::from(len)];
            stream.read_exact(&mut name).await.map_err(|e| e.to_string())?;
            String::from_utf8(name).map_err(|_| "the domain name is not UTF-8".to_string())?
        }
        4 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await.map_err(|e| e.to_string())?;
            Ipv6Addr::from(ip).to_string()
        }
        other => {
            let _ = reply(stream, ADDRESS_TYPE_NOT_SUPPORTED).await;
            return Err(format!("address type {other} is not supported"));
        }
    };
    let port = stream.read_u16().await.map_err(|e| e.to_string())?;
    if request[1] != CONNECT {
        let _ = reply(stream, COMMAND_NOT_SUPPORTED).await;
        return Err(format!("command {} is not supported (only CONNECT)", request[1]));
    }
    Ok((host, port))
}

/// The reply to a CONNECT; the bound address is not known through SSH, so it is 0.0.0.0:0.
pub async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, code: u8) -> std::io::Result<()> {
    stream.write_all(&[VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve(client_bytes: Vec<u8>) -> (Result<(String, u16), String>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        theirs.write_all(&client_bytes).await.unwrap();
        let result = handshake(&mut ours).await;
        drop(ours);
        let mut answer = Vec::new();
        theirs.read_to_end(&mut answer).await.unwrap();
        (result, answer)
    }

    #[tokio::test]
    async fn connect_requests_of_every_address_type() {
        let (got, answer) = serve(vec![5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 7, 0x1f, 0x90]).await;
        assert_eq!(got.unwrap(), ("10.0.0.7".to_string(), 8080));
        assert_eq!(answer, [5, 0]);
        let mut domain = vec![5, 2, 2, 0, 5, 1, 0, 3, 11];
        domain.extend_from_slice(b"db.internal");
        domain.extend_from_slice(&5432u16.to_be_bytes());
        assert_eq!(serve(domain).await.0.unwrap(), ("db.internal".to_string(), 5432));
        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(serve(v6).await.0.unwrap(), ("::1".to_string(), 443));
    }

    #[tokio::test]
    async fn what_it_cannot_serve_is_refused_with_the_right_code() {
        let (got, answer) = serve(vec![5, 1, 2]).await;
        assert!(got.unwrap_err().contains("no unauthenticated method"));
        assert_eq!(answer, [5, 0xff]);
        // BIND (2) is not CONNECT.
        let (got, answer) = serve(vec![5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await;
        assert!(got.unwrap_err().contains("only CONNECT"));
        assert_eq!(answer[..4], [5, 0, 5, COMMAND_NOT_SUPPORTED]);
        let (got, _) = serve(vec![4, 1, 0, 80, 127, 0, 0, 1, 0]).await;
        assert!(got.unwrap_err().contains("not SOCKS5"));
    }
}
