//! The HTTP endpoint: `/metrics` for Prometheus, `/health/live` and
//! `/health/ready` for container probes, `/status` with the routing table.
//!
//! hyper's HTTP/1 server parses requests; anything it cannot parse closes that
//! connection only, and unknown paths or methods get 404/405.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::show::lsn;
use crate::backend::Role;
use crate::proxy::Shared;

/// Serves HTTP until pgwarden stops listening.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HTTP endpoint listening (/metrics, /health/live, /health/ready, /status)");
    }
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shared.leaving.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}

fn json_line(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", format!("{value}\n"))
}

/// Routes one request.
pub fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/metrics" | "/health/live" | "/health/ready" | "/status"
    );
    if !known {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, "GET, HEAD".parse().expect("valid header"));
        return response;
    }
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            prometheus::TEXT_FORMAT,
            shared.metrics.render(&shared.pools, &shared.clients),
        ),
        "/health/live" => json_line(StatusCode::OK, json!({"status": "live"})),
        "/health/ready" => {
            let table = shared.routing.load();
            let (code, mut body) = match table.primary().filter(|p| p.routable()) {
                _ if shared.leaving.is_cancelled() => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "not ready", "reason": "shutting down"}),
                ),
                Some(primary) => (
                    StatusCode::OK,
                    json!({"status": "ready", "primary": primary.config.name}),
                ),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "not ready", "reason": "no primary available"}),
                ),
            };
            // Routing goes on without etcd, so readiness does not depend on it; it is reported.
            if let Some(c) = &shared.coordination {
                body["coordination"] = c.snapshot().to_json();
            }
            json_line(code, body)
        }
        _ => json_line(StatusCode::OK, status(shared)),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The routing table and the last primary change, as JSON.
pub fn status(shared: &Shared) -> serde_json::Value {
    let table = shared.routing.load_full();
    let backends: Vec<_> = table
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let facts = b.facts.as_ref();
            json!({
                "name": b.config.name,
                "addr": b.addr(),
                "role": match (table.primary == Some(i), b.role()) {
                    (true, _) => "primary",
                    (false, Some(Role::Primary)) => "primary (not routed)",
                    (false, Some(Role::Standby)) => "standby",
                    (false, None) => "unknown",
                },
                "state": b.health.name(),
                "fenced": b.fenced,
                "timeline": facts.and_then(|f| f.timeline),
                "lsn": facts.and_then(|f| f.lsn).map(lsn),
                "replay_lsn": facts.and_then(|f| f.replay_lsn).map(lsn),
                "lag_bytes": b.lag_bytes,
                "lag_seconds": facts.and_then(|f| f.replay_delay),
                "latency_ms": facts.map(|f| f.latency.as_secs_f64() * 1e3),
                "last_check": b.checked_at.map(rfc3339),
            })
        })
        .collect();
    let last = shared.history.all().pop().map(|r| {
        json!({
            "time": rfc3339(r.at),
            "kind": r.kind.name(),
            "old_primary": r.old_primary,
            "new_primary": r.new_primary,
            "timeline": r.timeline,
            "window_ms": r.window.as_millis() as u64,
        })
    });
    let paused = shared.gate.paused();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "generation": table.generation,
        "primary": table.primary().filter(|p| p.routable()).map(|p| p.config.name.clone()),
        "split_brain": table.split_brain,
        "paused": {"all": paused.all, "databases": paused.databases},
        "backends": backends,
        "last_failover": last,
        "coordination": shared.coordination.as_ref().map(|c| c.snapshot().to_json()),
    })
}
