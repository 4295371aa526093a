//! `proxy`: a byte stream to the box's sshd carried on our own stdin and stdout, for another SSH
//! client (OpenSSH runs us as its ProxyCommand). Stdin is read as the embedded client reads it
//! ([`super::stdin`]); stdout is written through `output` like a remote command's output.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resume::Io;
use super::stdin::StdinPump;

/// Copies stdin to the stream and the stream to stdout until sshd's side ends (stdin's end
/// only closes our side of the stream: the client has finished).
pub async fn pipe_stdio(stream: Box<dyn Io>) -> std::io::Result<()> {
    let (mut from_box, mut to_box) = tokio::io::split(stream);
    let up = async {
        let mut stdin = StdinPump::start()?;
        while let Some(chunk) = stdin.recv().await {
            to_box.write_all(&chunk?).await?;
            to_box.flush().await?;
        }
        to_box.shutdown().await
    };
    let down = async {
        let mut buf = vec![0u8; super::stdin::CHUNK];
        loop {
            let n = from_box.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            super::exec::write_now(false, &buf[..n])?;
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        done = &mut down => done,
        sent = &mut up => {
            sent?;
            down.await
        }
    }
}
