//! pgwarden logging in to a hostile or broken server with SCRAM-SHA-256: the
//! server-first and server-final messages come from the input and go through the
//! responder a server connection uses (a plain password) or the client with a key
//! recovered from a client's proof; the two parsers also get the raw input.
#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgwarden::auth::backend::BackendAuth;
use pgwarden::auth::scram::{Key, SCRAM_SHA_256, ScramClient, ServerFirst, parse_server_final};
use pgwarden::auth::userlist::ScramVerifier;
use pgwarden::auth::{Credential, Secret};
use pgwire::messages::startup::Authentication;

/// Derived once: PBKDF2 per run would make every run cost a millisecond.
static VERIFIER: LazyLock<ScramVerifier> = LazyLock::new(|| ScramVerifier::from_password("pw"));

/// Iteration counts up to this run the exchange; above it (up to the 1 000 000
/// pgwarden accepts) one PBKDF2 would cost up to a second and starve the search.
const CHEAP_ITERATIONS: u32 = 64;

/// The client nonce in a client-first message (`n,,n=,r=NONCE`), found at the end
/// of whatever carries it.
fn client_nonce(message: &[u8]) -> String {
    let at = message
        .windows(2)
        .rposition(|w| w == b"r=")
        .expect("client-first has a nonce");
    String::from_utf8(message[at + 2..].to_vec()).expect("the nonce is base64")
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let mut parts = rest.splitn(2, |&b| b == 0xff);
    let (first, last) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let _ = ServerFirst::parse(first, "nonce");
    let _ = parse_server_final(last);

    // Bit 0: the server's nonce extends ours, as a server's does (the input cannot
    // guess a random one); the input is what follows it.
    let with_nonce = |nonce: &str| -> Vec<u8> {
        if mode & 1 == 1 {
            [b"r=", nonce.as_bytes(), first].concat()
        } else {
            first.to_vec()
        }
    };
    let cheap = |server_first: &[u8], nonce: &str| {
        ServerFirst::parse(server_first, nonce).map_or(true, |f| f.iterations <= CHEAP_ITERATIONS)
    };

    if mode & 2 == 0 {
        let credential = Credential::new("u".into(), Secret::Plain("pw".into()));
        let mut auth = BackendAuth::new(&credential);
        let initial = auth
            .respond(Authentication::SASL(vec![SCRAM_SHA_256.into()]))
            .expect("a plain password speaks SCRAM")
            .expect("the initial response");
        let server_first = with_nonce(&client_nonce(&initial));
        if !cheap(&server_first, &client_nonce(&initial)) {
            return;
        }
        if auth
            .respond(Authentication::SASLContinue(Bytes::from(server_first)))
            .is_ok()
        {
            // Nobody signs without the server key.
            assert!(
                auth.respond(Authentication::SASLFinal(Bytes::copy_from_slice(last)))
                    .is_err()
            );
        }
    } else {
        let mut client = ScramClient::new(Key::Recovered {
            verifier: VERIFIER.clone(),
            client_key: [7; 32],
        });
        let nonce = client_nonce(&client.first());
        let server_first = with_nonce(&nonce);
        if client.respond(&server_first).is_ok() {
            assert!(client.finish(last).is_err());
        }
    }
});
