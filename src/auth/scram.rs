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

/// The attribute `name=` of a comma-separated SCRAM message.
fn attribute(message: &str, name: char) -> Option<&str> {
    message
        .split(',')
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
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

    /// Answers the server-first message with the client-final message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attribute(server_first, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed("nonce does not extend ours"));
        }
        let salt = attribute(server_first, 's')
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(ScramError::Malformed("no salt"))?;
        let iterations: usize = attribute(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed("no iteration count"))?;
        let (client_key, server_key) = match &self.key {
            Key::Password(password) => {
                let salted = gen_salted_password(password, &salt, iterations);
                (
                    hmac_sha256(&salted, &[b"Client Key"]),
                    hmac_sha256(&salted, &[b"Server Key"]),
                )
            }
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
        let server_final =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let verifier = attribute(server_final, 'v')
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
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
