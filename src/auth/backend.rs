//! pgwarden logging in to PostgreSQL as the client's user.
//!
//! A sans-IO responder: the server connection hands it each Authentication
//! request and sends back whatever it returns. What a secret can do towards the
//! server: a plain password answers cleartext, md5 and SCRAM; an md5 hash
//! answers md5 only; a SCRAM verifier answers SCRAM once a client has logged in
//! with it (its key recovered from the client's proof, see [`super::scram`]).
//! Anything else is a credentials error naming the user.

use bytes::Bytes;
use pgwire::messages::startup::{Authentication, Password, SASLInitialResponse, SASLResponse};

use super::scram::{SCRAM_SHA_256, ScramClient};
use super::userlist::{Credential, Secret, md5_response, md5_secret};
use crate::error::ServerError;
use crate::protocol::messages::frontend;

/// State of one login towards a server.
pub struct BackendAuth<'a> {
    credential: &'a Credential,
    scram: Option<ScramClient>,
}

impl<'a> BackendAuth<'a> {
    /// Starts a login with `credential`.
    pub fn new(credential: &'a Credential) -> Self {
        BackendAuth {
            credential,
            scram: None,
        }
    }

    /// Answers one Authentication request; `None` means nothing is to be sent.
    pub fn respond(&mut self, request: Authentication) -> Result<Option<Bytes>, ServerError> {
        Ok(match request {
            Authentication::Ok => None,
            Authentication::CleartextPassword => {
                Some(frontend(&Password::new(self.plain("password")?.to_owned())))
            }
            Authentication::MD5Password(salt) => {
                let salt: [u8; 4] = salt
                    .as_slice()
                    .try_into()
                    .map_err(|_| ServerError::Protocol("md5 salt is not four bytes".into()))?;
                let stored = match &self.credential.secret {
                    Secret::Md5(hash) => hash.clone(),
                    Secret::Plain(p) => md5_secret(&self.credential.name, p),
                    Secret::Scram(_) => return Err(self.unusable("md5")),
                };
                Some(frontend(&Password::new(md5_response(&stored, &salt))))
            }
            Authentication::SASL(mechanisms) => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(ServerError::Credentials(format!(
                        "server offers SASL mechanisms {mechanisms:?}, pgwarden speaks {SCRAM_SHA_256}"
                    )));
                }
                let key = self.credential.scram_key().ok_or_else(|| match self.credential.secret {
                    Secret::Scram(_) => ServerError::Credentials(format!(
                        "the user list holds a SCRAM verifier for user \"{}\", which logs in to the server only after a client has logged in with SCRAM; store the plain password",
                        self.credential.name
                    )),
                    _ => self.unusable("SCRAM-SHA-256"),
                })?;
                let scram = ScramClient::new(key);
                let first = Bytes::from(scram.first());
                self.scram = Some(scram);
                Some(frontend(&SASLInitialResponse::new(
                    SCRAM_SHA_256.to_owned(),
                    Some(first),
                )))
            }
            Authentication::SASLContinue(data) => {
                let last = self
                    .scram_state()?
                    .respond(&data)
                    .map_err(|e| ServerError::Credentials(format!("SCRAM: {e}")))?;
                Some(frontend(&SASLResponse::new(Bytes::from(last))))
            }
            Authentication::SASLFinal(data) => {
                self.scram_state()?
                    .finish(&data)
                    .map_err(|e| ServerError::Protocol(format!("SCRAM: {e}")))?;
                None
            }
            other => {
                return Err(ServerError::Credentials(format!(
                    "server asks for an authentication method pgwarden does not support ({other:?})"
                )));
            }
        })
    }

    fn plain(&self, method: &str) -> Result<&'a str, ServerError> {
        match &self.credential.secret {
            Secret::Plain(p) => Ok(p),
            _ => Err(self.unusable(method)),
        }
    }

    fn unusable(&self, method: &str) -> ServerError {
        ServerError::Credentials(format!(
            "server asks for {method} authentication, but the user list holds a {} for user \"{}\"; store the plain password",
            self.credential.secret.kind(),
            self.credential.name
        ))
    }

    /// The key derivation answering `request` needs, if it is a first SCRAM login
    /// with a password: to be run off the runtime's threads before [`Self::respond`].
    pub fn derivation(&self, request: &Authentication) -> Option<impl FnOnce() + Send + 'static> {
        match (request, &self.scram) {
            (Authentication::SASLContinue(data), Some(scram)) => scram.derivation(data),
            _ => None,
        }
    }

    fn scram_state(&mut self) -> Result<&mut ScramClient, ServerError> {
        self.scram
            .as_mut()
            .ok_or_else(|| ServerError::Protocol("SCRAM message before SASL start".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_answers_from_plain_and_hashed_secrets_alike() {
        let plain = Credential::new("app".into(), Secret::Plain("pw".into()));
        let hashed = Credential::new("app".into(), Secret::Md5(md5_secret("app", "pw")));
        let salt = vec![1, 2, 3, 4];
        let a = BackendAuth::new(&plain)
            .respond(Authentication::MD5Password(salt.clone()))
            .unwrap();
        let b = BackendAuth::new(&hashed)
            .respond(Authentication::MD5Password(salt))
            .unwrap();
        assert_eq!(a, b);
        assert!(a.is_some());
    }

    #[test]
    fn scram_needs_a_plain_password() {
        let hashed = Credential::new("app".into(), Secret::Md5(md5_secret("app", "pw")));
        let err = BackendAuth::new(&hashed)
            .respond(Authentication::SASL(vec![SCRAM_SHA_256.into()]))
            .unwrap_err();
        assert!(
            err.to_string().contains("md5 hash for user \"app\""),
            "{err}"
        );
        let plain = Credential::new("app".into(), Secret::Plain("pw".into()));
        let mut auth = BackendAuth::new(&plain);
        assert!(
            auth.respond(Authentication::SASLContinue(Bytes::from_static(b"x")))
                .is_err()
        );
        assert!(
            auth.respond(Authentication::SASL(vec![SCRAM_SHA_256.into()]))
                .unwrap()
                .is_some()
        );
    }
}
