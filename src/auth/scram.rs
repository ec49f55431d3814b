//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as the client side towards PostgreSQL, and
//! the recovery of a client's key from its proof.
//!
//! A client that proves itself to pgwarden with SCRAM sends
//! `ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)`. pgwarden knows
//! StoredKey (from the verifier) and AuthMessage (from the exchange), so it can
//! recover ClientKey, check that `H(ClientKey) = StoredKey`, and later log in to
//! PostgreSQL as that user with the same key, as long as the server holds the
//! same verifier (same salt and iteration count). This is what lets a user list
//! of SCRAM verifiers, or secrets found by `auth.query`, serve as server
//! credentials without any plain password.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pgwire::api::auth::sasl::scram::gen_salted_password;
use ring::{digest, hmac};

use super::userlist::ScramVerifier;

/// The mechanism name.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// What pgwarden logs in with.
#[derive(Clone)]
pub enum Key {
    /// a plain password: keys are derived for whatever salt the server sends
    Password(String),
    /// a client key recovered from a client's proof, valid for `verifier`'s salt
    /// and iteration count only
    Recovered {
        /// the verifier the key belongs to
        verifier: ScramVerifier,
        /// ClientKey
        client_key: [u8; 32],
    },
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// ClientKey and ServerKey of `password` for a server's salt and iteration count.
///
/// Remembered: a server sends a role the same salt at every login, and PBKDF2 at
/// PostgreSQL's 4,096 iterations takes milliseconds of a runtime thread that other
/// sessions share (all of them, with one worker), at every new server connection.
fn password_keys(password: &str, salt: &[u8], iterations: usize) -> ([u8; 32], [u8; 32]) {
    let id = derived_id(password, salt, iterations);
    if let Some(keys) = derived().get(&id) {
        return *keys;
    }
    let salted = gen_salted_password(password, salt, iterations);
    let keys = (
        hmac_sha256(&salted, &[b"Client Key"]),
        hmac_sha256(&salted, &[b"Server Key"]),
    );
    let mut derived = derived();
    // Bounded: a server that sends a new salt at every login cannot grow it forever.
    if derived.len() >= 1024 {
        derived.clear();
    }
    derived.insert(id, keys);
    keys
}

/// Keys derived so far, by [`derived_id`].
type Derived = HashMap<DerivedId, ([u8; 32], [u8; 32])>;

/// What a derivation depends on: the password (as its digest), salt and iteration count.
type DerivedId = ([u8; 32], Vec<u8>, usize);

fn derived_id(password: &str, salt: &[u8], iterations: usize) -> DerivedId {
    (sha256(password.as_bytes()), salt.to_vec(), iterations)
}

fn derived() -> std::sync::MutexGuard<'static, Derived> {
    static DERIVED: LazyLock<Mutex<Derived>> = LazyLock::new(Mutex::default);
    DERIVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most PBKDF2 iterations pgwarden runs for a server. PostgreSQL's default
/// (`scram_iterations`) is 4096; each iteration is two HMACs, so a server asking
/// for billions would hold a login (and a thread) for hours.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// A server-first message, checked: `r=nonce,s=salt,i=iterations`, in that order
/// and nothing else (as libpq reads it: an extension, a mandatory `m=` included,
/// is refused).
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    /// the combined nonce: the client's, then the server's part
    pub nonce: &'a str,
    /// the decoded salt
    pub salt: Vec<u8>,
    /// the PBKDF2 iteration count, 1 to [`MAX_ITERATIONS`]
    pub iterations: u32,
}

impl<'a> ServerFirst<'a> {
    /// Parses and bounds a server-first message; `client_nonce` is the nonce the
    /// client sent, which the server's must extend.
    pub fn parse(message: &'a [u8], client_nonce: &str) -> Result<ServerFirst<'a>, ScramError> {
        let message =
            std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut parts = message.split(',');
        let mut next = |name: &'static str, missing: &'static str| {
            parts
                .next()
                .and_then(|p| p.strip_prefix(name))
                .ok_or(ScramError::Malformed(missing))
        };
        let nonce = next("r=", "server-first does not start with a nonce (r=)")?;
        let salt = next("s=", "no salt (s=) after the nonce")?;
        let iterations = next("i=", "no iteration count (i=) after the salt")?;
        if parts.next().is_some() {
            return Err(ScramError::Malformed(
                "unexpected attributes after the iteration count",
            ));
        }
        // RFC 5802: printable ASCII but ','. It must start with ours and add to it.
        if !nonce.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ScramError::Malformed("nonce is not printable ASCII"));
        }
        if !nonce.starts_with(client_nonce) || nonce.len() == client_nonce.len() {
            return Err(ScramError::Malformed("nonce does not extend ours"));
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ScramError::Malformed("iteration count is not a number"));
        }
        let iterations = match iterations.parse::<u32>() {
            Ok(0) => return Err(ScramError::Malformed("iteration count is 0")),
            Ok(i) if i <= MAX_ITERATIONS => i,
            _ => {
                let shown: String = iterations.chars().take(30).collect();
                return Err(ScramError::TooManyIterations(shown));
            }
        };
        Ok(ServerFirst {
            nonce,
            salt,
            iterations,
        })
    }
}

/// The server signature of a server-final message (`v=signature`), or the error the
/// server reports in it (`e=reason`).
pub fn parse_server_final(message: &[u8]) -> Result<[u8; 32], ScramError> {
    let message = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    if let Some(reason) = message.strip_prefix("e=") {
        // Shown in errors and logs: bounded, and only what prints.
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        return Err(ScramError::ServerRefused(reason));
    }
    let signature = message
        .strip_prefix("v=")
        .ok_or(ScramError::Malformed("server-final has no signature (v=)"))?;
    if signature.contains(',') {
        return Err(ScramError::Malformed(
            "unexpected attributes after the server signature",
        ));
    }
    STANDARD
        .decode(signature)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(ScramError::Malformed(
            "server signature is not 32 bytes of base64",
        ))
}

/// Recovers ClientKey from a successful client exchange: `client_first` as the
/// client sent it (GS2 header included), `server_first` as pgwarden answered,
/// and `client_final` with its proof. `None` unless the proof is valid for
/// `verifier`.
pub fn recover_client_key(
    verifier: &ScramVerifier,
    client_first: &[u8],
    server_first: &[u8],
    client_final: &[u8],
) -> Option<[u8; 32]> {
    let client_first = std::str::from_utf8(client_first).ok()?;
    let client_final = std::str::from_utf8(client_final).ok()?;
    let server_first = std::str::from_utf8(server_first).ok()?;
    // The GS2 header is "flag,[authzid]," — the bare message follows the second comma.
    let mut header = client_first.splitn(3, ',');
    let (_, _, bare) = (header.next()?, header.next()?, header.next()?);
    let (without_proof, proof) = client_final.rsplit_once(",p=")?;
    let proof: [u8; 32] = STANDARD.decode(proof).ok()?.try_into().ok()?;
    let stored_key: [u8; 32] = verifier.stored_key.as_slice().try_into().ok()?;
    let auth_message = [bare, server_first, without_proof].join(",");
    let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
    let client_key = xor(&proof, &signature);
    (sha256(&client_key) == stored_key).then_some(client_key)
}

/// Why a SCRAM login to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    /// the server's message is not what SCRAM allows at that point
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    /// the server's verifier is not the one the recovered key belongs to
    #[error(
        "the server's SCRAM secret for this user differs from the one pgwarden checked the client against (password changed?)"
    )]
    OtherSecret,
    /// the server could not prove it knows the secret
    #[error("the server's SCRAM signature is wrong")]
    BadServerSignature,
    /// the server asks for more PBKDF2 iterations than pgwarden runs
    #[error(
        "the server asks for {0} SCRAM iterations, over pgwarden's limit of {MAX_ITERATIONS} (PostgreSQL's default is 4096)"
    )]
    TooManyIterations(String),
    /// the server ended the exchange with an error attribute
    #[error("the server refused the SCRAM exchange: {0}")]
    ServerRefused(String),
}

/// One SCRAM login to a server, sans I/O: [`ScramClient::first`], then
/// [`ScramClient::respond`] to the server-first message, then
/// [`ScramClient::finish`] with the server-final message.
pub struct ScramClient {
    key: Key,
    bare: String,
    nonce: String,
    /// AuthMessage and ServerKey, once the server-first message arrived
    pending: Option<(String, [u8; 32])>,
}

impl ScramClient {
    /// Starts a login; the client nonce is random.
    pub fn new(key: Key) -> ScramClient {
        let nonce_bytes: [u8; 18] = rand::random();
        let nonce = STANDARD.encode(nonce_bytes);
        // PostgreSQL takes the user from the startup packet and ignores n=.
        let bare = format!("n=,r={nonce}");
        ScramClient {
            key,
            bare,
            nonce,
            pending: None,
        }
    }

    /// The client-first message (no channel binding).
    pub fn first(&self) -> Vec<u8> {
        format!("n,,{}", self.bare).into_bytes()
    }

    /// The key derivation (PBKDF2) that answering `server_first` needs and that is
    /// not remembered yet, to be run off the runtime's threads before
    /// [`ScramClient::respond`], which then finds its keys remembered.
    pub fn derivation(&self, server_first: &[u8]) -> Option<impl FnOnce() + Send + 'static> {
        let Key::Password(password) = &self.key else {
            return None;
        };
        // A malformed message is refused by `respond`, with the reason.
        let first = ServerFirst::parse(server_first, &self.nonce).ok()?;
        let (salt, iterations) = (first.salt, first.iterations as usize);
        if derived().contains_key(&derived_id(password, &salt, iterations)) {
            return None;
        }
        let password = password.clone();
        Some(move || {
            password_keys(&password, &salt, iterations);
        })
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.pending.is_some() {
            return Err(ScramError::Malformed("a second server-first message"));
        }
        let ServerFirst {
            nonce,
            salt,
            iterations,
        } = ServerFirst::parse(server_first, &self.nonce)?;
        let iterations = iterations as usize;
        let (client_key, server_key) = match &self.key {
            Key::Password(password) => password_keys(password, &salt, iterations),
            Key::Recovered {
                verifier,
                client_key,
            } => {
                if verifier.salt != salt || verifier.iterations != iterations {
                    return Err(ScramError::OtherSecret);
                }
                let server_key = verifier
                    .server_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| ScramError::OtherSecret)?;
                (*client_key, server_key)
            }
        };
        // "biws" is base64("n,,"): no channel binding, no authzid.
        let without_proof = format!("c=biws,r={nonce}");
        // UTF-8, as the parse above checked.
        let server_first = String::from_utf8_lossy(server_first);
        let auth_message = format!("{},{server_first},{without_proof}", self.bare);
        let signature = hmac_sha256(&sha256(&client_key), &[auth_message.as_bytes()]);
        let proof = STANDARD.encode(xor(&client_key, &signature));
        self.pending = Some((auth_message, server_key));
        Ok(format!("{without_proof},p={proof}").into_bytes())
    }

    /// Checks the server-final message: the server must prove it holds ServerKey.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let (auth_message, server_key) = self
            .pending
            .as_ref()
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        let verifier = parse_server_final(server_final)?;
        let expected = hmac_sha256(server_key, &[auth_message.as_bytes()]);
        if super::constant_time_eq(&verifier, &expected) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire::api::auth::sasl::scram::ScramServerAuth;

    fn client() -> ScramClient {
        ScramClient::new(Key::Password("pw".into()))
    }

    /// A server-first message extending `client`'s nonce, with `rest` after it.
    fn server_first(client: &ScramClient, rest: &str) -> Vec<u8> {
        format!("r={}srv{rest}", client.nonce).into_bytes()
    }

    fn refused(first: &[u8], client: &mut ScramClient) -> String {
        client.respond(first).unwrap_err().to_string()
    }

    #[test]
    fn remembered_keys_are_the_derived_ones_and_differ_per_salt_password_and_count() {
        let first = password_keys("s3cret", b"salt-one", 4096);
        assert_eq!(password_keys("s3cret", b"salt-one", 4096), first);
        let salted = gen_salted_password("s3cret", b"salt-one", 4096);
        assert_eq!(first.0, hmac_sha256(&salted, &[b"Client Key"]));
        assert_ne!(password_keys("s3cret", b"salt-two", 4096), first);
        assert_ne!(password_keys("other", b"salt-one", 4096), first);
        assert_ne!(password_keys("s3cret", b"salt-one", 4097), first);
    }

    #[test]
    fn a_first_derivation_is_handed_out_to_run_elsewhere_and_then_remembered() {
        let mut c = ScramClient::new(Key::Password("handed-out".into()));
        let first = server_first(&c, ",s=aGFuZGVkLW91dA==,i=4096");
        let derive = c.derivation(&first).expect("not derived yet");
        std::thread::spawn(derive).join().unwrap();
        assert!(c.derivation(&first).is_none(), "remembered");
        assert!(c.respond(&first).is_ok());
        // Malformed: nothing to derive, and respond says why.
        assert!(client().derivation(b"r=nonsense").is_none());
    }

    #[test]
    fn hostile_server_first_messages_are_refused_before_any_hashing() {
        let mut c = client();
        let cases: &[(&str, &str)] = &[
            (",s=c2FsdA==,i=4096000000", "4096000000 SCRAM iterations"),
            (",s=c2FsdA==,i=1000001", "over pgwarden's limit of 1000000"),
            (
                ",s=c2FsdA==,i=99999999999999999999999",
                "99999999999999999999999 SCRAM",
            ),
            (",s=c2FsdA==,i=0", "iteration count is 0"),
            (",s=c2FsdA==,i=-1", "not a number"),
            (",s=c2FsdA==,i=+5", "not a number"),
            (",s=c2FsdA==,i=", "not a number"),
            (",s=c2FsdA==", "no iteration count"),
            (",s=not base64!,i=4096", "salt is not base64"),
            (",s=,i=4096", "empty salt"),
            (",i=4096,s=c2FsdA==", "no salt"),
            (",s=c2FsdA==,i=4096,m=ext", "unexpected attributes"),
        ];
        for (rest, expected) in cases {
            let first = server_first(&c, rest);
            let e = refused(&first, &mut c);
            assert!(e.contains(expected), "{rest}: {e}");
        }
        // Nonces: another client's, ours unextended, unprintable, or missing.
        for (first, expected) in [
            (
                b"r=someone-else,s=c2FsdA==,i=4096".to_vec(),
                "does not extend",
            ),
            (
                format!("r={},s=c2FsdA==,i=4096", c.nonce).into_bytes(),
                "does not extend",
            ),
            (server_first(&c, "\u{7f},s=c2FsdA==,i=4096"), "printable"),
            (b"s=c2FsdA==,i=4096".to_vec(), "does not start with a nonce"),
            (b"\xff".to_vec(), "UTF-8"),
        ] {
            let e = refused(&first, &mut c);
            assert!(e.contains(expected), "{first:?}: {e}");
        }
        // The bound itself is accepted.
        assert_eq!(
            ServerFirst::parse(&server_first(&c, ",s=c2FsdA==,i=1000000"), &c.nonce)
                .unwrap()
                .iterations,
            MAX_ITERATIONS
        );
    }

    #[test]
    fn hostile_server_final_messages_are_refused() {
        let mut c = client();
        let e = c.finish(b"v=AAAA").unwrap_err().to_string();
        assert!(e.contains("before server-first"), "{e}");
        c.respond(&server_first(&c, ",s=c2FsdA==,i=1")).unwrap();
        // A second server-first is not a way to start over with other parameters.
        assert!(refused(&server_first(&c, ",s=c2FsdA==,i=1"), &mut c).contains("second"));
        let good_length = STANDARD.encode([0u8; 32]);
        for (last, expected) in [
            (
                "e=invalid-proof".to_owned(),
                "refused the SCRAM exchange: invalid-proof",
            ),
            ("e=a\nb".to_owned(), "exchange: ab"),
            ("v=AAAA".to_owned(), "not 32 bytes"),
            ("v=!!".to_owned(), "not 32 bytes"),
            ("x=1".to_owned(), "no signature"),
            (format!("v={good_length},x=1"), "unexpected attributes"),
            (format!("v={good_length}"), "signature is wrong"),
        ] {
            let e = c.finish(last.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(expected), "{last}: {e}");
        }
    }

    /// A full exchange: pgwire's SCRAM server checks our client; the key recovered
    /// from that exchange then logs in again without the password.
    #[test]
    fn password_login_and_recovered_key_login_both_pass_a_real_server() {
        let verifier = ScramVerifier::from_password("s3cret");
        // The three messages a client sent or saw: client-first, server-first, client-final.
        type Exchange = (Vec<u8>, Vec<u8>, Vec<u8>);
        let run = |key: Key| -> Result<Exchange, String> {
            let mut client = ScramClient::new(key);
            let first = client.first();
            let (server_first, waiting) = ScramServerAuth::new()
                .on_client_first_message_with_secret(&first, verifier.to_secret())
                .map_err(|e| e.to_string())?;
            let last = client
                .respond(server_first.as_bytes())
                .map_err(|e| e.to_string())?;
            let server_final = waiting
                .on_client_final_message(&last)
                .map_err(|e| e.to_string())?;
            client
                .finish(server_final.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok((first, server_first.into_bytes(), last))
        };
        let (first, server_first, last) = run(Key::Password("s3cret".into())).unwrap();
        assert!(run(Key::Password("wrong".into())).is_err());

        let client_key = recover_client_key(&verifier, &first, &server_first, &last).unwrap();
        run(Key::Recovered {
            verifier: verifier.clone(),
            client_key,
        })
        .unwrap();

        // A tampered proof recovers nothing.
        let mut bad = last.clone();
        let at = bad.len() - 3;
        bad[at] = if bad[at] == b'A' { b'B' } else { b'A' };
        assert!(recover_client_key(&verifier, &first, &server_first, &bad).is_none());

        // A key for another verifier is refused before anything is sent.
        let other = ScramVerifier::from_password("s3cret");
        let mut client = ScramClient::new(Key::Recovered {
            verifier: other,
            client_key,
        });
        let (server_first, _) = ScramServerAuth::new()
            .on_client_first_message_with_secret(&client.first(), verifier.to_secret())
            .unwrap();
        assert!(matches!(
            client.respond(server_first.as_bytes()),
            Err(ScramError::OtherSecret)
        ));
    }
}
