//! Operating pgwarden: the admin console on the virtual database `pgwarden`
//! (PgBouncer's SHOW/PAUSE/RESUME/… plus cluster commands), and the HTTP
//! endpoint with Prometheus metrics, container health checks and status.

pub mod command;
mod compat;
mod console;
mod exec;
pub mod http;
mod show;
pub mod stats;
mod table;

pub use console::{Console, Role};
pub use show::lsn;
pub use table::{Cell, ResultSet};
