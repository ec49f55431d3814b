//! Authentication: clients proving themselves to pgwarden, and pgwarden proving
//! itself to PostgreSQL.
//!
//! Clients are checked against pgwarden's own user list ([`userlist`]), never
//! against the server: a client that fails here costs no server connection. An
//! unknown user goes through the same exchange with a throw-away secret and
//! fails with the same message as a wrong password, so user names cannot be
//! probed. [`backend`] holds the other direction.

pub mod backend;
pub mod cert;
pub mod hba;
pub mod peer;
pub mod query;
pub mod scram;
pub mod userlist;

use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use pgwire::api::auth::sasl::scram::ScramServerAuth;
use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::AuthMethod;
use crate::error::ClientError;
use crate::protocol::frame::read_message;
use crate::protocol::messages::put_auth;
use scram::SCRAM_SHA_256;
pub use userlist::{Credential, Secret, UserList};
use userlist::{ScramVerifier, md5_response};

/// Bound on any message a client sends during authentication.
const MAX_AUTH_MESSAGE: usize = 10_000;

/// Where server logins find a user's secret: the user list, then what
/// `auth.query` found.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// the user list
    pub users: Arc<ArcSwap<UserList>>,
    /// secrets found by `auth.query`
    pub queried: Arc<query::AuthQuery>,
}

impl Secrets {
    /// The credential of `user`, if pgwarden has one.
    pub fn get(&self, user: &str) -> Option<Arc<Credential>> {
        self.users
            .load()
            .get(user)
            .or_else(|| self.queried.cached(user))
    }
}

/// Runs the authentication exchange for `user` with the method from the config.
/// On success the caller sends AuthenticationOk; on failure the client gets 28P01.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthMethod,
    user: &str,
    credential: Option<Arc<Credential>>,
) -> Result<(), ClientError> {
    let failed = || ClientError::AuthFailed(user.to_owned());
    let mut exchange = Exchange {
        stream,
        user,
        buf: BytesMut::new(),
    };
    let verified = match (method, credential.as_deref()) {
        (AuthMethod::Trust, _) => return Ok(()),
        // As PostgreSQL does: md5 falls back to SCRAM for users that only have a SCRAM secret.
        (AuthMethod::Md5, Some(c)) => match c.md5() {
            Some(stored) => exchange.md5(Some(&stored)).await?,
            None => exchange.scram(Some(c)).await?,
        },
        (AuthMethod::Md5, None) => exchange.md5(None).await?,
        (AuthMethod::ScramSha256, c) => exchange.scram(c).await?,
        // Decided before any exchange: by the login's hba line, or by the certificate.
        (AuthMethod::Hba | AuthMethod::Cert, _) => false,
    };
    if verified { Ok(()) } else { Err(failed()) }
}

/// One client's side of the exchange: send a request, read the answer.
struct Exchange<'a, S> {
    stream: &'a mut S,
    user: &'a str,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<'_, S> {
    async fn send(&mut self, auth: Authentication) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        put_auth(&mut out, auth);
        self.stream.write_all(&out).await.map_err(gone)
    }

    /// Reads the next password-family message ('p') and returns its body.
    async fn receive(&mut self) -> Result<BytesMut, ClientError> {
        match read_message(self.stream, &mut self.buf, MAX_AUTH_MESSAGE).await {
            Ok((b'p', body)) => Ok(body),
            Ok((tag, _)) => Err(ClientError::Protocol(format!(
                "expected a password message, got message type '{}'",
                char::from(tag)
            ))),
            Err(e) => Err(ClientError::Protocol(format!(
                "authentication message: {e}"
            ))),
        }
    }

    /// md5 challenge against `stored`; `None` runs the exchange for a user that
    /// cannot succeed, so that it looks the same from outside.
    async fn md5(&mut self, stored: Option<&str>) -> Result<bool, ClientError> {
        let salt: [u8; 4] = rand::random();
        self.send(Authentication::MD5Password(salt.to_vec()))
            .await?;
        let body = self.receive().await?;
        let Some(stored) = stored else {
            return Ok(false);
        };
        let answer = cstring(&body).unwrap_or_default();
        Ok(constant_time_eq(
            answer,
            md5_response(stored, &salt).as_bytes(),
        ))
    }

    /// SCRAM-SHA-256 against the credential's verifier; without one, the exchange
    /// runs with a mock verifier that no password matches. A client that passes
    /// leaves its ClientKey with a stored verifier, for logging in to the server.
    async fn scram(&mut self, credential: Option<&Credential>) -> Result<bool, ClientError> {
        let verifier = credential.and_then(Credential::scram);
        let secret = match verifier {
            Some(v) => v.to_secret(),
            None => mock_verifier(self.user).to_secret(),
        };
        self.send(Authentication::SASL(vec![SCRAM_SHA_256.to_owned()]))
            .await?;
        let body = self.receive().await?;
        let (mechanism, client_first) = sasl_initial_response(&body)
            .ok_or_else(|| ClientError::Protocol("malformed SASLInitialResponse".into()))?;
        if mechanism != SCRAM_SHA_256.as_bytes() {
            return Err(ClientError::Protocol(format!(
                "client selected an invalid SASL authentication mechanism \"{}\"",
                String::from_utf8_lossy(mechanism)
            )));
        }
        let (server_first, waiting) = ScramServerAuth::new()
            .on_client_first_message_with_secret(client_first, secret)
            .map_err(|e| ClientError::Protocol(format!("SCRAM: {e}")))?;
        self.send(Authentication::SASLContinue(Bytes::from(
            server_first.clone(),
        )))
        .await?;
        let client_final = self.receive().await?;
        match waiting.on_client_final_message(&client_final) {
            Ok(server_final) if verifier.is_some() => {
                if let Some(c) = credential {
                    c.learn_client_key(client_first, server_first.as_bytes(), &client_final);
                }
                self.send(Authentication::SASLFinal(Bytes::from(server_final)))
                    .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Splits a SASLInitialResponse body into mechanism name and client-first data.
/// Parsed here rather than by pgwire, whose decoder panics on a truncated body.
fn sasl_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let (mechanism, rest) = (&body[..end], &body[end + 1..]);
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    match usize::try_from(len) {
        Ok(n) if n == data.len() => Some((mechanism, data)),
        _ => None,
    }
}

fn cstring(body: &[u8]) -> Option<&[u8]> {
    body.iter().position(|&b| b == 0).map(|end| &body[..end])
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The verifier an unknown user is challenged with. Its salt is stable per user
/// name (as PostgreSQL's mock salt is), so asking twice cannot tell an unknown
/// user from a real one; its keys are random, so no password matches, and no
/// PBKDF2 runs: a flood of logins with made-up names costs no hashing.
fn mock_verifier(user: &str) -> ScramVerifier {
    static PROCESS_KEY: LazyLock<ring::hmac::Key> = LazyLock::new(|| {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>())
    });
    let salt = ring::hmac::sign(&PROCESS_KEY, user.as_bytes());
    ScramVerifier {
        iterations: pgwire::api::auth::sasl::scram::SCRAM_ITERATIONS,
        salt: salt.as_ref()[..16].to_vec(),
        stored_key: rand::random::<[u8; 32]>().to_vec(),
        server_key: rand::random::<[u8; 32]>().to_vec(),
    }
}

fn gone(e: std::io::Error) -> ClientError {
    ClientError::Protocol(format!(
        "client connection failed during authentication: {e}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_response_is_bounds_checked() {
        let mut ok = b"SCRAM-SHA-256\0".to_vec();
        ok.extend_from_slice(&3i32.to_be_bytes());
        ok.extend_from_slice(b"abc");
        assert_eq!(
            sasl_initial_response(&ok),
            Some((&b"SCRAM-SHA-256"[..], &b"abc"[..]))
        );
        assert_eq!(sasl_initial_response(b"SCRAM-SHA-256\0\0\0"), None);
        let mut long = b"SCRAM-SHA-256\0".to_vec();
        long.extend_from_slice(&100i32.to_be_bytes());
        assert_eq!(sasl_initial_response(&long), None);
        let mut negative = b"M\0".to_vec();
        negative.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(sasl_initial_response(&negative), None);
        assert_eq!(sasl_initial_response(b"no terminator"), None);
    }

    #[test]
    fn unknown_users_get_a_stable_salt_without_hashing() {
        // Found while fuzzing (200 logins/s): each unknown user used to cost a PBKDF2.
        let start = std::time::Instant::now();
        let a = mock_verifier("nobody");
        for _ in 0..1000 {
            assert_eq!(mock_verifier("nobody").salt, a.salt);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert_ne!(mock_verifier("somebody").salt, a.salt);
        assert_ne!(mock_verifier("nobody").stored_key, a.stored_key);
    }

    #[test]
    fn constant_time_eq_compares_lengths_and_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
