//! Frame boundaries on a PostgreSQL byte stream.
//!
//! After startup every message is a type byte and an Int32 length that counts
//! itself. The proxy forwards bytes as they arrive; [`Scanner`] walks those bytes
//! once, frame by frame, so that the few messages pgwarden must read are seen
//! whole while everything else (DataRow, CopyData, …) streams through without
//! being buffered or copied.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Type byte plus Int32 length.
pub const HEADER_LEN: usize = 5;

/// Largest message pgwarden accepts from a server, the bound PostgreSQL puts on its
/// largest messages; also the ceiling of `pool.max_message_size`, which bounds what
/// clients send.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Largest message pgwarden buffers whole to read it (errors, parameter status, auth).
pub const MAX_BUFFERED_LEN: usize = 1 << 20;

/// A malformed frame header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below its own four bytes.
    #[error("message of type '{tag}' has invalid length {len}", tag = char::from(*.tag))]
    BadLength {
        /// type byte
        tag: u8,
        /// the length field as sent
        len: i64,
    },
    /// The length is over what pgwarden accepts for this message.
    #[error("message of type '{tag}' is {len} bytes, over the limit of {max}", tag = char::from(*.tag))]
    TooLong {
        /// type byte
        tag: u8,
        /// the length field as sent
        len: usize,
        /// the limit that applied
        max: usize,
    },
}

/// Reads the header at the start of `buf`: the type byte and the whole frame length
/// (header included). `None` while fewer than five bytes are there.
pub fn header(buf: &[u8], max: usize) -> Option<Result<(u8, usize), FrameError>> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Some(if len < 4 {
        Err(FrameError::BadLength {
            tag,
            len: len.into(),
        })
    } else if len as usize > max {
        Err(FrameError::TooLong {
            tag,
            len: len as usize,
            max,
        })
    } else {
        Ok((tag, len as usize + 1))
    })
}

/// One step of a [`Scanner`] over a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// This many leading bytes belong to a frame already announced; pass them on.
    Body(usize),
    /// A frame the caller asked to see whole is complete at the start of the buffer.
    Whole {
        /// type byte
        tag: u8,
        /// frame length, header included
        len: usize,
    },
    /// The header of a streamed frame: the caller passes these five bytes on and the
    /// body follows as [`Scan::Body`] steps.
    Header {
        /// type byte
        tag: u8,
    },
    /// More bytes are needed before anything can be said.
    NeedMore,
    /// The stream is not valid PostgreSQL framing.
    Invalid(FrameError),
}

/// Frame-boundary state for one direction of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Scanner {
    body_left: usize,
    /// longest frame accepted, streamed or not
    max: usize,
}

/// A server's direction: frames up to [`MAX_MESSAGE_LEN`].
impl Default for Scanner {
    fn default() -> Self {
        Scanner::new(MAX_MESSAGE_LEN)
    }
}

impl Scanner {
    /// A scanner that refuses frames longer than `max` bytes (`pool.max_message_size`
    /// for a client's direction).
    pub fn new(max: usize) -> Scanner {
        Scanner { body_left: 0, max }
    }

    /// The longest frame this scanner accepts.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Changes the longest frame accepted from the next frame header on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// True between frames: no announced body is still on its way.
    pub fn at_boundary(&self) -> bool {
        self.body_left == 0
    }

    /// Body bytes of the current frame not seen yet.
    pub fn body_left(&self) -> usize {
        self.body_left
    }

    /// Passes up to `available` body bytes of the current frame; returns how many.
    pub fn pass(&mut self, available: usize) -> usize {
        let n = self.body_left.min(available);
        self.body_left -= n;
        n
    }

    /// Starts a frame whose body (`len` bytes after the header) will stream.
    pub fn begin(&mut self, len: usize) {
        self.body_left = len;
    }

    /// Examines the bytes at the start of `buf`. `whole(tag)` says which frames the
    /// caller wants complete (bounded by [`MAX_BUFFERED_LEN`]); others stream.
    /// The caller consumes exactly what the step names before calling again.
    pub fn next(&mut self, buf: &[u8], whole: impl Fn(u8) -> bool) -> Scan {
        if self.body_left > 0 {
            if buf.is_empty() {
                return Scan::NeedMore;
            }
            let n = self.body_left.min(buf.len());
            self.body_left -= n;
            return Scan::Body(n);
        }
        let wants_whole = buf.first().is_some_and(|&t| whole(t));
        let max = if wants_whole {
            MAX_BUFFERED_LEN
        } else {
            self.max
        };
        match header(buf, max) {
            None => Scan::NeedMore,
            Some(Err(e)) => Scan::Invalid(e),
            Some(Ok((tag, len))) if wants_whole => {
                if buf.len() >= len {
                    Scan::Whole { tag, len }
                } else {
                    Scan::NeedMore
                }
            }
            Some(Ok((tag, len))) => {
                self.body_left = len - HEADER_LEN;
                Scan::Header { tag }
            }
        }
    }
}

/// Why reading a whole message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Reads one whole message into `buf` and returns its type and body. Used outside the
/// hot path (login, pgwarden's own queries), where messages are small.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, BytesMut), ReadError> {
    loop {
        if let Some(h) = header(buf, max) {
            let (tag, len) = h?;
            if buf.len() >= len {
                let mut frame = buf.split_to(len);
                frame.advance(HEADER_LEN);
                return Ok((tag, frame));
            }
            buf.reserve(len - buf.len());
        } else {
            buf.reserve(512);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_rejects_short_and_negative_lengths() {
        assert_eq!(
            header(&[b'Q', 0, 0, 0, 3], MAX_MESSAGE_LEN),
            Some(Err(FrameError::BadLength { tag: b'Q', len: 3 }))
        );
        assert!(matches!(
            header(&[b'Q', 0xff, 0xff, 0xff, 0xff], MAX_MESSAGE_LEN),
            Some(Err(FrameError::BadLength { len: -1, .. }))
        ));
        assert!(matches!(
            header(&[b'Q', 0x7f, 0xff, 0xff, 0xff], MAX_MESSAGE_LEN),
            Some(Err(FrameError::TooLong { .. }))
        ));
        assert_eq!(header(&[b'Q', 0, 0], MAX_MESSAGE_LEN), None);
    }

    #[test]
    fn streams_bodies_and_delivers_wanted_frames_whole() {
        let mut bytes = frame(b'D', b"0123456789");
        bytes.extend(frame(b'Z', b"I"));
        let mut s = Scanner::default();
        let wants_z = |t| t == b'Z';
        assert_eq!(s.next(&bytes, wants_z), Scan::Header { tag: b'D' });
        assert!(!s.at_boundary());
        // Body arrives in pieces.
        assert_eq!(s.next(&bytes[5..9], wants_z), Scan::Body(4));
        assert_eq!(s.next(&bytes[9..], wants_z), Scan::Body(6));
        assert!(s.at_boundary());
        // The 'Z' frame is only reported once complete.
        assert_eq!(s.next(&bytes[15..19], wants_z), Scan::NeedMore);
        assert_eq!(
            s.next(&bytes[15..], wants_z),
            Scan::Whole { tag: b'Z', len: 6 }
        );
    }

    #[test]
    fn wanted_frames_are_bounded() {
        let mut s = Scanner::default();
        let mut big = vec![b'E'];
        big.extend_from_slice(&((MAX_BUFFERED_LEN + 10) as i32).to_be_bytes());
        assert!(matches!(
            s.next(&big, |_| true),
            Scan::Invalid(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn streamed_frames_are_bounded_by_the_scanners_limit() {
        let mut s = Scanner::new(100);
        assert_eq!(
            s.next(&frame(b'd', &[0; 96]), |_| false),
            Scan::Header { tag: b'd' }
        );
        let mut s = Scanner::new(100);
        assert_eq!(
            s.next(&frame(b'd', &[0; 97]), |_| false),
            Scan::Invalid(FrameError::TooLong {
                tag: b'd',
                len: 101,
                max: 100
            })
        );
    }

    #[tokio::test]
    async fn read_message_splits_one_frame_and_keeps_the_rest() {
        let mut bytes = frame(b'R', &[0, 0, 0, 0]);
        bytes.extend(frame(b'Z', b"I"));
        let mut input = bytes.as_slice();
        let mut buf = BytesMut::new();
        let (tag, body) = read_message(&mut input, &mut buf, 100).await.unwrap();
        assert_eq!((tag, &body[..]), (b'R', &[0u8, 0, 0, 0][..]));
        let (tag, body) = read_message(&mut input, &mut buf, 100).await.unwrap();
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert!(read_message(&mut input, &mut buf, 100).await.is_err());
    }
}
