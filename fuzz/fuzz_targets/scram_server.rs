//! Client authentication as pgwarden runs it (SCRAM-SHA-256 server side, and md5),
//! fed the client's messages from the input; plus the recovery of a client's key
//! from arbitrary exchange messages.
#![no_main]

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use pgwarden::auth::scram::recover_client_key;
use pgwarden::auth::userlist::ScramVerifier;
use pgwarden::auth::{Credential, Secret, authenticate};
use pgwarden::config::AuthMethod;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Derived once: PBKDF2 per run would make every run cost a millisecond.
static VERIFIER: LazyLock<ScramVerifier> = LazyLock::new(|| ScramVerifier::from_password("pw"));

/// A client that sends the input and ignores what pgwarden answers; never pending.
struct Script<'a>(&'a [u8]);

impl AsyncRead for Script<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let method = if mode & 1 == 0 {
        AuthMethod::ScramSha256
    } else {
        AuthMethod::Md5
    };
    let secret = if mode & 2 == 0 {
        Secret::Scram(VERIFIER.clone())
    } else {
        Secret::Md5(pgwarden::auth::userlist::md5_secret("u", "pw"))
    };
    let credential = Arc::new(Credential::new("u".into(), secret));
    // Bit 2: a user pgwarden does not know (the mock verifier).
    let credential = (mode & 4 == 0).then_some(credential);
    let mut client = Script(rest);
    let outcome = authenticate(&mut client, method, "u", credential)
        .now_or_never()
        .expect("the script never blocks");
    // Nobody without the password gets in (the server nonce is random).
    assert!(outcome.is_err());

    // Key recovery on arbitrary (client-first, server-first, client-final) triples.
    let mut parts = rest.splitn(3, |&b| b == 0xff);
    let (a, b, c) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    assert!(recover_client_key(&VERIFIER, a, b, c).is_none());
});
