//! Hostile input: every malformed shape a client can send, thousands of
//! half-open connections and a flood of made-up cancel keys, all at once, while
//! legitimate clients keep running queries. pgwarden must answer each bad client
//! with an error (or just close it), never leak a server connection to one, keep
//! its memory bounded, and keep serving everyone else.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden, Raw, error_code, frame, startup_packet};
use md5::{Digest, Md5};

/// Half-open connections held at once. The test process and pgwarden each need
/// one descriptor per connection; below that limit the count is lowered and said so.
const HALF_OPEN: usize = 10_000;
/// What each held connection may add to pgwarden's RSS (a debug build measured ~8 KiB).
const MAX_KIB_PER_CONNECTION: u64 = 16;
/// Server connections per pool: a client that leaked one would soon starve the others.
const POOL_SIZE: usize = 3;

/// Raises the soft descriptor limit to the hard one (pgwarden inherits it) and
/// returns how many half-open connections fit.
fn raise_fd_limit() -> usize {
    let limit = pgwarden::open_files::raise().expect("the open-files limit can be read");
    let room = (limit as usize).saturating_sub(500);
    if room < HALF_OPEN {
        eprintln!(
            "file descriptor limit {limit}: holding {room} half-open connections instead of {HALF_OPEN}"
        );
    }
    room.min(HALF_OPEN)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("pgwarden is gone");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw connection logged in with md5, at ReadyForQuery.
fn logged_in(port: u16, db: &Db) -> Raw {
    let mut raw = Raw::connect(port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let (tag, body) = raw.read().expect("auth request");
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &5i32.to_be_bytes()[..]),
        "md5 asked"
    );
    let inner = md5_hex(&[db.password.as_bytes(), db.user.as_bytes()]);
    let answer = format!("md5{}\0", md5_hex(&[inner.as_bytes(), &body[4..8]]));
    raw.message(b'p', answer.as_bytes());
    let seen = raw.read_until(b'Z');
    assert_eq!(seen.last().map(|m| m.0), Some(b'Z'), "login: {seen:?}");
    raw
}

/// Sends `bytes` and expects an 08P01 ErrorResponse, then the close.
fn expect_protocol_error(raw: Raw, bytes: &[u8], what: &str) {
    expect_error(raw, bytes, "08P01", what);
}

/// Sends `bytes` and expects an ErrorResponse with SQLSTATE `code`, then the close.
fn expect_error(mut raw: Raw, bytes: &[u8], code: &str, what: &str) {
    raw.send(bytes);
    let (tag, body) = raw
        .read()
        .unwrap_or_else(|| panic!("{what}: closed without an error"));
    assert_eq!(
        (tag, error_code(&body).as_str()),
        (b'E', code),
        "{what}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(raw.read().is_none(), "{what}: connection left open");
}

/// Sends `bytes` and closes without waiting for anything.
fn send_and_leave(port: u16, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.write_all(bytes);
    }
}

/// Every malformed shape, before and after authentication.
fn malformed_traffic(port: u16, db: &Db) {
    let startup = startup_packet(196_608, &[("user", &db.user), ("database", &db.name)]);
    // Before authentication.
    for _ in 0..100 {
        // Truncated startup packet: announces 100 bytes, sends 10, leaves.
        let mut p = 100u32.to_be_bytes().to_vec();
        p.extend_from_slice(&startup[4..10]);
        send_and_leave(port, &p);
        // Startup cut in the middle of a parameter.
        send_and_leave(port, &startup[..startup.len() - 3]);
    }
    let mut raw = Raw::connect(port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let _ = raw.read().expect("auth request");
    expect_protocol_error(
        raw,
        &frame(b'Z', b"I"),
        "unknown type instead of a password",
    );
    let mut raw = Raw::connect(port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let _ = raw.read().expect("auth request");
    expect_protocol_error(raw, &[b'p', 0, 0, 0, 2], "password message with length 2");
    let mut raw = Raw::connect(port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let _ = raw.read().expect("auth request");
    expect_protocol_error(
        raw,
        &[b'p', 0x7f, 0xff, 0xff, 0xff],
        "password message of 2 GiB",
    );
    let raw = Raw::connect(port);
    expect_protocol_error(
        raw,
        &[0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0],
        "negative startup length",
    );

    // After authentication.
    expect_protocol_error(
        logged_in(port, db),
        &frame(b'y', b"x"),
        "unknown message type",
    );
    expect_protocol_error(logged_in(port, db), &[b'Q', 0, 0, 0, 3], "length below 4");
    expect_error(
        logged_in(port, db),
        &[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S'],
        "54000",
        "message over pool.max_message_size",
    );
    expect_protocol_error(
        logged_in(port, db),
        &[b'Q', 0xff, 0xff, 0xff, 0xfe],
        "negative message length",
    );
    for i in 0..30 {
        let mut raw = logged_in(port, db);
        match i % 3 {
            // Truncated query: the header says 1000 bytes, ten arrive, the client leaves.
            0 => {
                let mut bytes = vec![b'Q'];
                bytes.extend_from_slice(&1000u32.to_be_bytes());
                bytes.extend_from_slice(b"SELECT 1; ");
                raw.send(&bytes);
            }
            // Inside a transaction block, then a truncated frame.
            1 => {
                raw.message(b'Q', b"BEGIN; CREATE TEMP TABLE hostile_t(x int)\0");
                let _ = raw.read_until(b'Z');
                raw.send(&[b'Q', 0, 0, 0, 50, b'S', b'E']);
            }
            // An extended-protocol batch without its Sync.
            _ => {
                let mut bytes = frame(b'P', b"\0SELECT pg_sleep(0.05)\0\0\0");
                bytes.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
                bytes.extend(frame(b'E', b"\0\0\0\0\0"));
                raw.send(&bytes);
            }
        }
        drop(raw);
    }
}

/// CancelRequests with made-up keys, each on its own connection.
fn cancel_flood(port: u16, count: usize) {
    for i in 0..count {
        let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        let key = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        p.extend_from_slice(&key.to_be_bytes());
        send_and_leave(port, &p);
    }
}

/// Connections that connect and then say nothing, or only part of a startup packet.
fn half_open(port: u16, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            if i % 2 == 1 {
                let _ = s.write_all(&[0, 0, 0]);
            }
            Some(s)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_legitimate_ones() {
    let half_open_count = raise_fd_limit();
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            auth: Some("md5".into()),
            pgwarden: "max_client_conn = 15000\nclient_login_timeout = \"60s\"\n".into(),
            pool: format!("default_pool_size = {POOL_SIZE}\nquery_wait_timeout = \"5s\"\n"),
            ..Default::default()
        },
    );
    let port = pgw.port;

    // Legitimate clients: short transactions and a slow query a stray cancel must not hit.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let client = pgw.connect(&db).await;
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sql = if w == 0 {
                    "SELECT pg_sleep(0.2)"
                } else {
                    "BEGIN; SELECT count(*) FROM pg_class; COMMIT"
                };
                client
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("legitimate client {w} after {n} queries: {e:?}"));
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pgw.pid());
    let started = Instant::now();

    let db2 = db.clone();
    let malformed = tokio::task::spawn_blocking(move || malformed_traffic(port, &db2));
    let cancels = tokio::task::spawn_blocking(move || cancel_flood(port, 5_000));
    let held = tokio::task::spawn_blocking(move || half_open(port, half_open_count))
        .await
        .unwrap();
    malformed.await.unwrap();
    cancels.await.unwrap();
    eprintln!(
        "attack sent in {:?}: {} half-open connections held",
        started.elapsed(),
        held.len()
    );
    assert!(
        held.len() >= half_open_count * 9 / 10,
        "could not open the connections"
    );

    // With every half-open connection still held: new clients log in and run
    // queries, and nothing was leaked to the bad clients (pool of 3, 6 slow queries).
    let before = done.load(Ordering::Relaxed);
    let mut fresh = Vec::new();
    for _ in 0..6 {
        let client = pgw.connect(&db).await;
        fresh.push(tokio::spawn(async move {
            client.batch_execute("SELECT pg_sleep(0.3)").await
        }));
    }
    for f in fresh {
        f.await
            .unwrap()
            .expect("a fresh client's query during the attack");
    }
    let peak = rss_kib(pgw.pid());
    eprintln!(
        "pgwarden RSS: {baseline} KiB before, {peak} KiB with {} half-open connections",
        held.len()
    );
    let bound = baseline + MAX_KIB_PER_CONNECTION * held.len() as u64;
    assert!(
        peak < bound,
        "pgwarden RSS {peak} KiB (from {baseline} KiB) over {bound} KiB"
    );
    common::eventually(
        Duration::from_secs(5),
        "legitimate queries keep running",
        || done.load(Ordering::Relaxed) > before + 10,
    )
    .await;

    // No server session was left behind inside a transaction by a client that left.
    let direct = db.direct().await;
    let mut lingering = i64::MAX;
    for _ in 0..50 {
        lingering = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if lingering == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lingering, 0,
        "a server connection stayed inside a dead client's transaction"
    );

    drop(held);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.await.unwrap() > 0);
    }
    // The process survived all of it and still serves.
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert!(
        std::fs::read_to_string(format!("/proc/{}/status", pgw.pid()))
            .is_ok_and(|s| !s.contains("State:\tZ")),
        "pgwarden died"
    );
}
