//! Both directions of a splice as the proxy walks them: the client's messages
//! (Query, Parse, Bind, Describe, Close, … with prepared-statement renaming),
//! the server's answers (ReadyForQuery, ParameterStatus, ErrorResponse,
//! ParseComplete, …) matched against what the client asked, the batch
//! pgwarden answers without a server, and a failed transaction block's answers.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwarden::client::aborted::Aborted;
use pgwarden::client::expect::Expected;
use pgwarden::client::splice::{Ctx, Exchange};
use pgwarden::client::statements::{ClientStatements, Registry, ServerStatements};
use pgwarden::client::{frontend, responses};
use pgwarden::params::ParamSet;
use pgwarden::protocol::frame::{HEADER_LEN, Scanner, header};

fuzz_target!(|data: &[u8]| {
    // flags, piece size, then client bytes and server bytes split at the first 0xff 0xff.
    let [flags, piece, rest @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece).max(1);
    let split = rest.windows(2).position(|w| w == [0xff, 0xff]);
    let (client, server) = match split {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };
    let registry = Registry::default();
    let mut client_statements = ClientStatements::default();
    let _ = frontend::prepare_without_server(client, &mut client_statements, &registry, "");

    let mut expected = Expected::default();
    let mut server_statements = ServerStatements::default();
    let mut applied = None;
    let mut params = Arc::new(ParamSet::default());
    let mut status = b'I';
    let mut client_scan = Scanner::default();
    let mut x = Exchange::default();
    let mut cx = Ctx {
        expected: &mut expected,
        server_statements: &mut server_statements,
        applied: &mut applied,
        client_statements: &mut client_statements,
        registry: &registry,
        max_prepared: if flags & 1 == 0 {
            0
        } else {
            usize::from(flags >> 4) + 1
        },
        transaction_pooling: flags & 2 != 0,
        params: &mut params,
        status: &mut status,
        scanner: &mut client_scan,
        x: &mut x,
    };
    let mut inbuf = BytesMut::new();
    let mut to_server = BytesMut::new();
    for chunk in client.chunks(piece) {
        inbuf.extend_from_slice(chunk);
        if frontend::forward(&mut inbuf, &mut to_server, &mut cx).is_err() {
            return;
        }
    }
    let mut server_scan = Scanner::default();
    let mut server_in = BytesMut::new();
    let mut to_client = BytesMut::new();
    for chunk in server.chunks(piece) {
        server_in.extend_from_slice(chunk);
        match responses::forward(&mut server_in, &mut server_scan, &mut to_client, &mut cx) {
            Ok(true) => {
                assert!(cx.idle());
                break;
            }
            Ok(false) => {}
            Err(_) => break,
        }
    }

    // The client's frames once more, answered as a failed transaction block would be.
    let mut aborted = Aborted::new(None);
    let mut out = BytesMut::new();
    let mut pos = 0;
    while let Some(Ok((tag, len))) = client.get(pos..).and_then(|b| header(b, 1 << 20)) {
        let body = client.get(pos + HEADER_LEN..pos + len);
        aborted.answer(tag, body, &mut out);
        pos += len;
    }
});
