//! The startup packet: the first thing a client sends, before any typed message.
//!
//! It is length-prefixed but has no type byte; its first Int32 says what it is
//! (protocol version, SSLRequest, GSSENCRequest or CancelRequest). pgwarden reads
//! exactly the announced length, bounded like PostgreSQL bounds it, and hands
//! that isolated buffer to pgwire's decoders so a malformed packet can never read
//! into whatever the client sent after it.

use bytes::BytesMut;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{SecretKey, Startup};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::ClientError;

/// PostgreSQL's own limit on a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// What the client's startup packet asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupRequest {
    /// SSLRequest: answer `S` or `N`, then read another startup packet.
    Ssl,
    /// GSSENCRequest: answer `N`, then read another startup packet.
    GssEnc,
    /// CancelRequest with the key pgwarden issued to some client.
    Cancel {
        /// process id from BackendKeyData
        pid: i32,
        /// secret key from BackendKeyData
        secret: i32,
    },
    /// StartupMessage.
    Startup {
        /// requested minor protocol version (major is always 3)
        minor: u16,
        /// parameters in the order sent
        params: Vec<(String, String)>,
    },
}

/// Reads one startup packet. Errors are protocol violations the client must be told about.
pub async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<StartupRequest, StartupError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = i32::from_be_bytes(len);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(StartupError::Invalid(ClientError::Protocol(format!(
            "invalid startup packet length {len}"
        ))));
    }
    let mut packet = BytesMut::zeroed(len as usize);
    packet[..4].copy_from_slice(&len.to_be_bytes());
    stream.read_exact(&mut packet[4..]).await?;
    parse_startup(packet).map_err(StartupError::Invalid)
}

/// Why no startup packet could be read.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The client went away or the socket failed; nobody to answer.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The packet is malformed; the client gets this error.
    #[error("{0}")]
    Invalid(ClientError),
}

/// Decodes a complete startup packet (length prefix included).
pub fn parse_startup(mut packet: BytesMut) -> Result<StartupRequest, ClientError> {
    let invalid = |what: &str| ClientError::Protocol(format!("invalid {what} packet"));
    let Some(&[a, b, c, d]) = packet.get(4..8) else {
        return Err(invalid("startup"));
    };
    let code = u32::from_be_bytes([a, b, c, d]);
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    match code {
        SSL_REQUEST if packet.len() == 8 => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST if packet.len() == 8 => Ok(StartupRequest::GssEnc),
        SSL_REQUEST | GSSENC_REQUEST => Err(invalid("SSL/GSS negotiation")),
        CANCEL_REQUEST => match CancelRequest::decode(&mut packet, &ctx) {
            Ok(Some(CancelRequest {
                pid,
                secret_key: SecretKey::I32(secret),
                ..
            })) if packet.is_empty() => Ok(StartupRequest::Cancel { pid, secret }),
            _ => Err(invalid("cancel request")),
        },
        _ if code >> 16 != 3 => Err(ClientError::Unsupported(format!(
            "unsupported frontend protocol {}.{}: pgwarden supports 3.0",
            code >> 16,
            code & 0xffff
        ))),
        _ => {
            // A valid StartupMessage ends with an empty name; without it the
            // parameter list is cut short.
            if packet.last() != Some(&0) {
                return Err(invalid("startup"));
            }
            match Startup::decode(&mut packet, &ctx) {
                Ok(Some(startup)) => Ok(StartupRequest::Startup {
                    minor: startup.protocol_number_minor,
                    params: startup.parameters.into_iter().collect(),
                }),
                _ => Err(invalid("startup")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut p = BytesMut::new();
        p.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            parse_startup(packet(SSL_REQUEST, b"")).unwrap(),
            StartupRequest::Ssl
        );
        assert_eq!(
            parse_startup(packet(GSSENC_REQUEST, b"")).unwrap(),
            StartupRequest::GssEnc
        );
        let mut key = Vec::new();
        key.extend_from_slice(&7i32.to_be_bytes());
        key.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup(packet(CANCEL_REQUEST, &key)).unwrap(),
            StartupRequest::Cancel { pid: 7, secret: -9 }
        );
        let got = parse_startup(packet(196_608, b"user\0app\0database\0db\0\0")).unwrap();
        assert_eq!(
            got,
            StartupRequest::Startup {
                minor: 0,
                params: vec![
                    ("database".into(), "db".into()),
                    ("user".into(), "app".into())
                ]
            }
        );
    }

    #[test]
    fn rejects_malformed_packets() {
        assert!(parse_startup(packet(SSL_REQUEST, b"x")).is_err());
        assert!(parse_startup(packet(CANCEL_REQUEST, b"1234")).is_err());
        assert!(parse_startup(packet(CANCEL_REQUEST, b"123456789")).is_err());
        assert!(parse_startup(packet(196_608, b"user\0app")).is_err());
        // Found by fuzzing: shorter than length + code.
        assert!(parse_startup(BytesMut::new()).is_err());
        assert!(parse_startup(BytesMut::from(&[0u8, 0, 0, 8, 0][..])).is_err());
        assert!(matches!(
            parse_startup(packet(131_072, b"\0")),
            Err(ClientError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn bounds_the_length_before_reading() {
        let mut input: &[u8] = &[0x7f, 0, 0, 0, 1, 2, 3, 4];
        assert!(matches!(
            read_startup(&mut input).await,
            Err(StartupError::Invalid(_))
        ));
        let mut input: &[u8] = &[0, 0, 0, 4];
        assert!(matches!(
            read_startup(&mut input).await,
            Err(StartupError::Invalid(_))
        ));
    }
}
