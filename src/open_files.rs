//! The open-files limit. Every client and every server connection is a file
//! descriptor, and the soft limit a login shell or a service manager hands out
//! (often 1024) would stop pgwarden far below `max_client_conn`, while the hard
//! limit is the administrator's real ceiling. So, as Go's runtime and many
//! servers do, pgwarden raises its soft limit to the hard one at start-up, and
//! warns when even that is below what the configuration may use, as PgBouncer
//! logs its "max expected fd use".

use std::io;

use crate::config::Config;

/// Descriptors besides connections: listeners, the log, probes, HTTP, etcd.
const OVERHEAD: u64 = 64;

/// The most a soft limit is raised to when the hard one is unlimited (Linux's
/// default `fs.nr_open`, above which setrlimit fails).
const UNLIMITED_CEILING: u64 = 1 << 20;

/// The most descriptors the configuration may hold at once: every client, and
/// every server connection its pools may open on every node, for `users` users.
pub fn needed(config: &Config, users: usize) -> u64 {
    let users = users.max(1) as u64;
    let per_node: u64 = config
        .databases
        .keys()
        .filter_map(|name| config.database(name))
        .map(|db| {
            let pools = u64::from(db.pool_size + config.pool.reserve_pool_size) * users;
            match db.max_db_connections {
                0 => pools,
                cap => pools.min(cap.into()),
            }
        })
        .sum();
    let per_node = match config.pool.max_user_connections {
        0 => per_node,
        cap => per_node.min(u64::from(cap) * users),
    };
    config.pgwarden.max_client_conn as u64 + per_node * config.backends.len() as u64 + OVERHEAD
}

/// Raises the soft limit to the hard one, and returns the limit now in force.
pub fn raise() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        let ceiling = if limit.rlim_max == libc::RLIM_INFINITY {
            UNLIMITED_CEILING
        } else {
            limit.rlim_max
        };
        if limit.rlim_cur < ceiling {
            let raised = libc::rlimit {
                rlim_cur: ceiling,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Raises the limit and says in the log whether the configuration fits under it.
pub fn raise_and_report(config: &Config, users: usize) {
    let needed = needed(config, users);
    match raise() {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-files limit is below what max_client_conn and the pools may use: connections beyond it cannot be accepted or opened; raise the hard limit (systemd LimitNOFILE, ulimit -Hn)"
        ),
        Ok(limit) => tracing::info!(limit, needed, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, needed, "cannot raise the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let text = format!(
            "{text}\n[[backends]]\nname = \"a\"\nhost = \"h\"\n[[backends]]\nname = \"b\"\nhost = \"h\"\n\
             [databases.one]\n[databases.two]\npool_size = 5\n"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn clients_plus_every_pool_on_every_node() {
        // (20 + 5) pool places for each of 3 users, on 2 nodes.
        let c = config("[pgwarden]\nmax_client_conn = 1000");
        assert_eq!(needed(&c, 3), 1000 + (20 + 5) * 3 * 2 + OVERHEAD);
        let c = config("[pgwarden]\nmax_client_conn = 1000\n[pool]\nreserve_pool_size = 2");
        assert_eq!(needed(&c, 3), 1000 + (22 + 7) * 3 * 2 + OVERHEAD);
    }

    #[test]
    fn caps_bound_the_server_connections() {
        let c = config("[pgwarden]\nmax_client_conn = 100\n[pool]\nmax_db_connections = 10");
        assert_eq!(needed(&c, 3), 100 + (10 + 10) * 2 + OVERHEAD);
        let c = config("[pgwarden]\nmax_client_conn = 100\n[pool]\nmax_user_connections = 4");
        assert_eq!(needed(&c, 3), 100 + 4 * 3 * 2 + OVERHEAD);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise().unwrap();
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into a local struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(now.rlim_cur, limit);
        assert!(now.rlim_max == libc::RLIM_INFINITY || now.rlim_cur == now.rlim_max);
    }
}
