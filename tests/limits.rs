//! Limits a client runs into: `pool.max_message_size` closes only the client that
//! sent a message over it.

mod common;

use common::{Db, Options, Pgwarden, Raw, error_code, frame};

/// A raw client logged in (trust), at ReadyForQuery.
fn logged_in(pgw: &Pgwarden, db: &Db) -> Raw {
    let mut raw = Raw::connect(pgw.port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let seen = raw.read_until(b'Z');
    assert_eq!(seen.last().map(|m| m.0), Some(b'Z'), "login: {seen:?}");
    raw
}

#[tokio::test]
async fn a_message_over_max_message_size_closes_only_that_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            auth: Some("trust".into()),
            pool: "max_message_size = \"4MB\"".into(),
            ..Default::default()
        },
    );
    let bystander = pgw.connect(&db).await;
    bystander
        .batch_execute("CREATE TABLE blobs(b bytea)")
        .await
        .unwrap();

    // Under the limit: a 2 MB value streams through both ways.
    let blob = vec![7u8; 2 << 20];
    bystander
        .execute("INSERT INTO blobs VALUES ($1)", &[&blob])
        .await
        .unwrap();
    let back: Vec<u8> = bystander
        .query_one("SELECT b FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back, blob);

    // Over it: the header alone is enough for the error, then the close.
    let mut raw = logged_in(&pgw, &db);
    let mut header = vec![b'Q'];
    header.extend_from_slice(&((4 << 20) + 100u32).to_be_bytes());
    raw.send(&header);
    raw.send(&[b' '; 1000]);
    let (tag, body) = raw.read().expect("an error before the close");
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "54000"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("pool.max_message_size"), "{text}");
    assert!(raw.read().is_none(), "connection left open");

    // A streamed message (CopyData) over it, in the middle of a COPY, the same.
    let mut raw = logged_in(&pgw, &db);
    raw.message(b'Q', b"COPY blobs FROM STDIN\0");
    assert_eq!(raw.read().map(|m| m.0), Some(b'G'));
    raw.send(&frame(b'd', b"\\\\x00\n"));
    let mut header = vec![b'd'];
    header.extend_from_slice(&((5 << 20) as u32).to_be_bytes());
    raw.send(&header);
    let (tag, body) = raw.read().expect("an error before the close");
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "54000"));
    assert!(raw.read().is_none(), "connection left open");

    // Nobody else noticed, and the COPY's server connection was not pooled mid-copy.
    let rows: i64 = bystander
        .query_one("SELECT count(*) FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
