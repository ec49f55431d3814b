//! PostgreSQL wire format: startup packets, frame boundaries, and the messages
//! pgwarden reads or writes itself.
//!
//! Everything else on the wire is forwarded as raw bytes; this module is what lets
//! the proxy do that safely.

pub mod frame;
pub mod messages;
pub mod startup;

pub use messages::ServerNotice;
