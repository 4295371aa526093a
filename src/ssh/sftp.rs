//! SFTP on the session's one pinned connection: a channel running the box's `sftp` subsystem,
//! spoken by the russh-sftp client. Reads and writes are pipelined (many requests in flight), so
//! a transfer is not one round trip per chunk.

use anyhow::{Context, bail};
use russh::ChannelMsg;
use russh_sftp::client::{Config, SftpSession};

use super::Session;

/// SFTP requests of one file kept in flight at once, each way (OpenSSH's `sftp` keeps 64).
const REQUESTS_IN_FLIGHT: usize = 64;
/// Bytes per write request, at most: the server's own limit (255 KiB for OpenSSH's) caps it.
const WRITE_PACKET: u32 = 256 * 1024;
/// How long one request may go unanswered before the transfer fails.
const REQUEST_TIMEOUT_SECS: u64 = 60;

impl Session {
    /// Opens an SFTP session on this connection.
    pub async fn sftp(&self) -> anyhow::Result<SftpSession> {
        let mut channel =
            self.handle.channel_open_session().await.context("cannot open an SSH channel on the box")?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .context("the SSH connection dropped before SFTP started")?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => bail!(
                    "the box's sshd refused the sftp subsystem: enable `Subsystem sftp` in its sshd_config"
                ),
                Some(_) => continue,
            }
        }
        let config = Config {
            max_concurrent_reads: REQUESTS_IN_FLIGHT,
            max_concurrent_writes: REQUESTS_IN_FLIGHT,
            max_write_packet_len: WRITE_PACKET,
            request_timeout_secs: REQUEST_TIMEOUT_SECS,
            ..Config::default()
        };
        SftpSession::new_with_config(channel.into_stream(), config)
            .await
            .map_err(|e| anyhow::anyhow!("SFTP did not start on the box: {e}"))
    }
}
