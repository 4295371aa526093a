//! The presigned URL against known answers computed with botocore's `SigV4QueryAuth` (what the
//! AWS CLI's `open-tunnel` uses), and the frame adapter against a local WebSocket server.

use super::*;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const HOST: &str = "eice-0123456789abcdef0.1a2b3c4d.ec2-instance-connect-endpoint.us-east-1.amazonaws.com";

fn target(dial_url: Option<String>) -> EiceTarget {
    EiceTarget {
        endpoint_id: "eice-0123456789abcdef0".into(),
        dns_name: HOST.into(),
        region: "us-east-1".into(),
        private_ip: "10.0.1.25".into(),
        port: 22,
        resumable: false,
        max_duration: MAX_TUNNEL,
        dial_url,
        credentials: SharedCredentialsProvider::new(creds(None)),
    }
}

fn creds(token: Option<&str>) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        token.map(str::to_string),
        None,
        "test",
    )
}

/// 2026-11-30T12:00:00Z.
fn noon() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_040_000)
}

/// botocore 1.44.8, `SigV4QueryAuth(creds, "ec2-instance-connect", "us-east-1", expires=60)`.
#[test]
fn presigned_url_matches_botocore() {
    let url = presign(&target(None), creds(None), noon()).unwrap();
    assert_eq!(
        url,
        format!(
            "wss://{HOST}/openTunnel?instanceConnectEndpointId=eice-0123456789abcdef0&remotePort=22&privateIpAddress=10.0.1.25&maxTunnelDuration=3600&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261130%2Fus-east-1%2Fec2-instance-connect%2Faws4_request&X-Amz-Date=20261130T120000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=5cda795b71bfba840ec94bc93889c947a5d5c54bbff5cd712dd3dbadaa2636d1"
        )
    );
}

#[test]
fn presigned_url_with_a_session_token_matches_botocore() {
    let url = presign(&target(None), creds(Some("FwoGZXIvYXdzEXAMPLE/token+=")), noon()).unwrap();
    assert!(url.contains("&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE%2Ftoken%2B%3D"), "{url}");
    // The token is signed (botocore lists it before the signature; the order does not matter).
    assert!(
        url.contains("&X-Amz-Signature=9bd5e1dd9d29ae9b06f34b4a44d3df06e851a31d69e31b97965cbaa6b2970d43"),
        "{url}"
    );
}

#[test]
fn the_local_cloud_is_dialled_with_the_same_signed_query() {
    let t = target(Some("ws://127.0.0.1:4567/".into()));
    let signed = presign(&t, creds(None), noon()).unwrap();
    let dialled = dial_url(&signed, &t);
    assert_eq!(dialled, signed.replace(&format!("wss://{HOST}"), "ws://127.0.0.1:4567"));
}

/// A WebSocket server on loopback: checks the Host header, then runs `script` on the socket.
async fn server<F, Fut>(script: F) -> String
where
    F: FnOnce(WebSocketStream<tokio::net::TcpStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let check = |request: &Request, response: Response| {
            assert_eq!(request.headers()["host"], HOST);
            assert!(request.uri().query().unwrap().contains("X-Amz-Signature="));
            Ok(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, check).await.unwrap();
        script(ws).await;
    });
    format!("ws://{addr}")
}

#[tokio::test]
async fn bytes_travel_as_binary_frames_of_at_most_65000_bytes() {
    let (sizes_tx, sizes_rx) = tokio::sync::oneshot::channel();
    let url = server(|mut ws| async move {
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while got.len() < 150_000 {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(data) => {
                    sizes.push(data.len());
                    got.extend_from_slice(&data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        ws.send(Message::Binary(got.into())).await.unwrap();
        let _ = sizes_tx.send(sizes);
        ws.close(None).await.unwrap();
    })
    .await;
    let mut io = open(&target(Some(url))).await.unwrap();
    let sent: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    io.write_all(&sent).await.unwrap();
    io.flush().await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, sent);
    let sizes = sizes_rx.await.unwrap();
    assert!(sizes.iter().all(|&n| n <= MAX_FRAME), "{sizes:?}");
    assert!(io.ending().normal(), "{:?}", io.ending().get());
}

#[tokio::test]
async fn a_text_frame_ends_the_stream_with_its_text() {
    let url = server(|mut ws| async move {
        ws.send(Message::Binary(b"SSH-2.0-x\r\n".to_vec().into())).await.unwrap();
        ws.send(Message::Text("Connection to the instance failed".into())).await.unwrap();
        let _ = ws.next().await;
    })
    .await;
    let mut io = open(&target(Some(url))).await.unwrap();
    let mut buf = [0u8; 11];
    io.read_exact(&mut buf).await.unwrap();
    let err = io.read(&mut [0u8; 16]).await.unwrap_err();
    assert!(err.to_string().contains("Connection to the instance failed"), "{err}");
    assert!(!io.ending().normal());
}

#[tokio::test]
async fn a_close_other_than_1000_carries_its_reason() {
    let url = server(|mut ws| async move {
        let frame = CloseFrame { code: CloseCode::Error, reason: "relay failed".into() };
        ws.close(Some(frame)).await.unwrap();
    })
    .await;
    let mut io = open(&target(Some(url))).await.unwrap();
    let err = io.read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(err.to_string(), "the endpoint closed the tunnel (code 1011): relay failed");
}

#[tokio::test]
async fn an_http_refusal_names_its_status_and_body() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let body = "Signature expired";
        let reply = format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        tcp.write_all(reply.as_bytes()).await.unwrap();
    });
    let err = open(&target(Some(format!("ws://{addr}")))).await.err().unwrap();
    assert!(
        matches!(&err, EiceError::Refused { status: 403, body } if body == "Signature expired"),
        "{err:?}"
    );
    assert!(err.to_string().contains("ec2-instance-connect:OpenTunnel"), "{err}");
}

/// A tunnel that just breaks (no close frame) is not an orderly end: nothing reattaches on it.
#[tokio::test]
async fn a_dropped_connection_is_not_a_normal_end() {
    let url = server(|ws| async move { drop(ws) }).await;
    let mut io = open(&target(Some(url))).await.unwrap();
    let mut buf = Vec::new();
    let _ = io.read_to_end(&mut buf).await;
    assert!(!io.ending().normal(), "{:?}", io.ending().get());
}
