//! Certificate authentication: a TLS client is the user its certificate's common
//! name says, once the handshake has checked the certificate against `tls.ca_file`.

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::ClientError;
use crate::tls::Stream;

/// Succeeds when the client on `stream` presented a verified certificate whose
/// common name is `user`.
pub fn check(stream: &Stream, user: &str) -> Result<(), ClientError> {
    match stream.client_certificate().and_then(common_name) {
        Some(name) if name == user => Ok(()),
        _ => Err(ClientError::CertFailed(user.to_owned())),
    }
}

/// The subject's common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_subjects_common_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app_user");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(super::common_name(cert.der()).as_deref(), Some("app_user"));
        assert_eq!(super::common_name(b"not a certificate"), None);
    }
}
