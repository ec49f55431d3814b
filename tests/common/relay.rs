//! A TCP relay a test puts between pgwarden and one PostgreSQL node, to fail the
//! path rather than the node: the node and its replication stay healthy while
//! pgwarden loses it (reset), stops hearing from it (a silent partition), or
//! hears its health monitor's answers late (a busy server, as probes see it).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// forwards everything
    Pass,
    /// holds back every answer to the health monitor (its connections announce
    /// `application_name=pgwarden-monitor`) by a second; client traffic passes
    SlowMonitor,
    /// accepts connections but forwards nothing, and keeps what it holds until the
    /// mode changes: a network path that went silent
    Blackhole,
    /// closes every connection, and each new one at once: a path that went away
    Reset,
    /// holds each CancelRequest a second before passing it on: a cancel still on
    /// its way while the query it was meant for ends
    SlowCancel,
}

/// A relay on `port` to a node on `target`; it stops when dropped.
pub struct Relay {
    pub port: u16,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying `port` → `target` (both on 127.0.0.1).
    pub async fn start(target: u16, port: u16) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (mode, watching) = watch::channel(Mode::Pass);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                if *watching.borrow() == Mode::Reset {
                    continue;
                }
                conns.spawn(relay(inbound, target, watching.clone()));
            }
        });
        Relay { port, mode, task }
    }

    /// Switches what the relay does, for open connections too.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(inbound: TcpStream, target: u16, mut mode: watch::Receiver<Mode>) {
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut client_r, mut client_w) = inbound.into_split();
    let (mut server_r, mut server_w) = outbound.into_split();
    let (monitor_tx, monitor) = watch::channel(false);
    let up = {
        let mut mode = mode.clone();
        async move {
            let mut buf = vec![0u8; 8192];
            let mut head = Vec::new();
            loop {
                let n = match client_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if head.len() < 2048 {
                    head.extend_from_slice(&buf[..n]);
                    let name: &[u8] = b"pgwarden-monitor";
                    if head.windows(name.len()).any(|w| w == name) {
                        monitor_tx.send_replace(true);
                    }
                    // A CancelRequest: length 16, then the cancel code 80877102.
                    let cancel = head.get(..8) == Some(&[0, 0, 0, 16, 4, 210, 22, 46][..]);
                    if cancel && *mode.borrow() == Mode::SlowCancel {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if !passes(&mut mode).await || server_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = {
        let mut mode = mode.clone();
        async move {
            let mut buf = vec![0u8; 8192];
            loop {
                let n = match server_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if *monitor.borrow() && *mode.borrow() == Mode::SlowMonitor {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if !passes(&mut mode).await || client_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    // Either direction ending, or a reset, drops both sockets.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = mode.wait_for(|m| *m == Mode::Reset) => {}
    }
}

/// Waits out a black hole; false when the connection is to be dropped instead.
async fn passes(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Blackhole).await {
        Ok(m) => *m != Mode::Reset,
        Err(_) => false,
    }
}
