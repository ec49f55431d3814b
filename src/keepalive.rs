//! TCP keepalive and user timeout on the sockets pgwarden holds, to clients and
//! to servers.
//!
//! A peer that vanishes without a FIN or RST (a host powered off, a dropped NAT
//! or firewall entry) leaves an idle socket looking open forever. Keepalive probes
//! find it: a client slot held by a vanished client is freed, and so is a server
//! connection still finishing the query of a client that left, whose server host
//! is gone. `tcp_user_timeout` bounds how long sent data may go unacknowledged.
//! The settings are PgBouncer's `tcp_*` settings, with the system's values wherever
//! one is left at 0.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::General;

/// The `tcp_*` settings of `[pgwarden]`, ready to apply to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// whether idle sockets are probed at all
    pub enabled: bool,
    /// idle time before the first probe; `None`: the system's
    pub idle: Option<Duration>,
    /// time between probes; `None`: the system's
    pub interval: Option<Duration>,
    /// unanswered probes before the connection is dropped; `None`: the system's
    pub count: Option<u32>,
    /// how long sent data may stay unacknowledged; `None`: the system's
    pub user_timeout: Option<Duration>,
}

impl Keepalive {
    /// The settings as configured.
    pub fn from_config(g: &General) -> Keepalive {
        let set = |d: Duration| (!d.is_zero()).then_some(d);
        Keepalive {
            enabled: g.tcp_keepalive,
            idle: set(g.tcp_keepidle),
            interval: set(g.tcp_keepintvl),
            count: (g.tcp_keepcnt != 0).then_some(g.tcp_keepcnt),
            user_timeout: set(g.tcp_user_timeout),
        }
    }

    /// Sets these options on `tcp`.
    pub fn apply(&self, tcp: &TcpStream) -> io::Result<()> {
        let socket = SockRef::from(tcp);
        if self.enabled {
            let mut probes = TcpKeepalive::new();
            if let Some(idle) = self.idle {
                probes = probes.with_time(idle);
            }
            if let Some(interval) = self.interval {
                probes = probes.with_interval(interval);
            }
            if let Some(count) = self.count {
                probes = probes.with_retries(count);
            }
            socket.set_tcp_keepalive(&probes)?;
        } else {
            socket.set_keepalive(false)?;
        }
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn configured_values_reach_the_socket_and_unset_ones_keep_the_systems() {
        let (a, b) = pair().await;
        let system = SockRef::from(&b).tcp_keepalive_time().unwrap();
        let keepalive = Keepalive {
            enabled: true,
            idle: Some(Duration::from_secs(42)),
            interval: Some(Duration::from_secs(7)),
            count: Some(4),
            user_timeout: Some(Duration::from_millis(2500)),
        };
        keepalive.apply(&a).unwrap();
        let s = SockRef::from(&a);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );

        let only_on = Keepalive {
            enabled: true,
            idle: None,
            interval: None,
            count: None,
            user_timeout: None,
        };
        only_on.apply(&b).unwrap();
        let s = SockRef::from(&b);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), system);
        assert_eq!(s.tcp_user_timeout().unwrap(), None);

        Keepalive {
            enabled: false,
            ..only_on
        }
        .apply(&b)
        .unwrap();
        assert!(!SockRef::from(&b).keepalive().unwrap());
    }
}
