//! An admin console session: `psql -p 6432 -U admin pgwarden`.
//!
//! The client logged in like any other (same port, same authentication); here
//! pgwarden answers it itself, in the simple query protocol, with result sets
//! built from pgwire's message types. Commands are parsed by [`super::command`],
//! carried out by [`super::exec`].

use crate::address::Address;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::tls::Stream;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::command::{self, Command};
use super::exec;
use crate::error::{ClientError, sqlstate};
use crate::protocol::ServerNotice;
use crate::protocol::frame::{MAX_BUFFERED_LEN, read_message};
use crate::protocol::messages::{
    put_backend_key, put_command_complete, put_error, put_notice, put_parameter_status, put_ready,
};
use crate::proxy::Shared;

/// What an admin console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// every command (`pgwarden.admin_users`)
    Admin,
    /// SHOW only (`pgwarden.stats_users`)
    Stats,
}

/// A logged-in admin console client.
pub struct Console {
    stream: Stream,
    peer: Address,
    shared: Arc<Shared>,
    user: String,
    role: Role,
}

impl Console {
    /// Welcomes the client; on failure the socket is handed back.
    pub async fn start(
        mut stream: Stream,
        peer: Address,
        shared: Arc<Shared>,
        user: String,
        role: Role,
    ) -> Result<Console, Stream> {
        let mut out = BytesMut::new();
        for (name, value) in [
            (
                "server_version",
                concat!("15.0 (pgwarden ", env!("CARGO_PKG_VERSION"), ")"),
            ),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("TimeZone", "UTC"),
            ("application_name", ""),
        ] {
            put_parameter_status(&mut out, name, value);
        }
        put_backend_key(&mut out, 0, 0);
        put_ready(&mut out, b'I');
        if stream.write_all(&out).await.is_err() {
            return Err(stream);
        }
        info!(%peer, %user, ?role, "admin console login");
        Ok(Console {
            stream,
            peer,
            shared,
            user,
            role,
        })
    }

    /// Answers commands until the client leaves, counted among the sessions (SHOW LISTS).
    pub async fn run(self) {
        let shared = self.shared.clone();
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        self.serve().await;
        shared.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    async fn serve(mut self) {
        let mut buf = BytesMut::new();
        let mut skipping = false;
        loop {
            // A console waiting for its next command must not hold up a shutdown.
            let (tag, body) = tokio::select! {
                read = read_message(&mut self.stream, &mut buf, MAX_BUFFERED_LEN) => match read {
                    Ok(m) => m,
                    Err(_) => return,
                },
                () = self.shared.shutdown.cancelled() => {
                    crate::client::farewell(&mut self.stream, &ClientError::Shutdown.to_notice(true)).await;
                    return;
                }
            };
            let mut out = BytesMut::new();
            match tag {
                b'Q' => {
                    let sql = String::from_utf8_lossy(crate::protocol::messages::query_text(&body))
                        .into_owned();
                    self.answer(&sql, &mut out).await;
                    put_ready(&mut out, b'I');
                }
                b'X' => return,
                // The extended protocol is refused once per batch, then skipped to Sync.
                b'S' => {
                    skipping = false;
                    put_ready(&mut out, b'I');
                }
                _ if skipping => continue,
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {
                    skipping = true;
                    let notice = ServerNotice::new(
                        "ERROR",
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console speaks the simple query protocol only",
                    );
                    put_error(&mut out, &notice);
                }
                other => {
                    let e = ClientError::Protocol(format!(
                        "invalid frontend message type '{}'",
                        char::from(other)
                    ));
                    put_error(&mut out, &e.to_notice(true));
                    let _ = self.stream.write_all(&out).await;
                    return;
                }
            }
            if self.stream.write_all(&out).await.is_err() {
                return;
            }
            if self.shared.shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn answer(&mut self, sql: &str, out: &mut BytesMut) {
        let command = match command::parse(sql) {
            Ok(c) => c,
            Err(message) => {
                put_error(
                    out,
                    &ServerNotice::new("ERROR", sqlstate::SYNTAX_ERROR, message),
                );
                return;
            }
        };
        if self.role == Role::Stats && !command.is_read_only() {
            let e = ClientError::NotAllowed(format!(
                "user \"{}\" is a stats user: SHOW only (pgwarden.admin_users may do more)",
                self.user
            ));
            put_error(out, &e.to_notice(false));
            return;
        }
        if !matches!(command, Command::Show(_) | Command::Empty | Command::Set(_)) {
            info!(peer = %self.peer, user = %self.user, command = %sql.trim(), "admin command");
        }
        match exec::run(&self.shared, command).await {
            Ok(exec::Answer::Rows(rows)) => rows.encode(out),
            Ok(exec::Answer::Done { tag, notice }) => {
                if let Some(text) = notice {
                    put_notice(out, &ServerNotice::new("NOTICE", "00000", text));
                }
                put_command_complete(out, tag);
            }
            Ok(exec::Answer::Empty) => out.extend_from_slice(&[b'I', 0, 0, 0, 4]),
            Err(notice) => {
                warn!(peer = %self.peer, user = %self.user, error = %notice.message, "admin command failed");
                put_error(out, &notice);
            }
        }
    }
}
