//! What a server connection still owes: one entry per request sent, in order.
//!
//! PostgreSQL answers requests in the order it receives them, so the head of
//! this queue says what the next server message belongs to. That is how
//! pgwarden swallows the answers to messages it injected (a Parse before a
//! Bind, a Close of an evicted statement), answers requests it did not
//! forward at exactly the right place in the stream (a ParseComplete for a
//! statement the server already has), and knows when the connection owes the
//! client nothing and may serve someone else.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::statements::Statement;

/// One request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// simple Query: everything up to ReadyForQuery
    Query,
    /// FunctionCall: FunctionCallResponse, then ReadyForQuery
    Function,
    /// Sync: ReadyForQuery
    Sync,
    /// Parse: ParseComplete (swallowed when pgwarden injected it)
    Parse {
        /// the client did not send it
        swallow: bool,
        /// the statement it prepares under its server-side name: confirmed when it
        /// succeeds, forgotten by the server connection if it fails
        statement: Option<Arc<Statement>>,
        /// the client's name for it, forgotten if it fails
        client_name: Option<Bytes>,
    },
    /// Bind: BindComplete; the named statement it binds, if any
    Bind(Option<Arc<Statement>>),
    /// Describe: (ParameterDescription,) RowDescription or NoData; the named
    /// statement it describes, if any
    Describe(Option<Arc<Statement>>),
    /// Execute: rows, then CommandComplete, EmptyQueryResponse or PortalSuspended
    Execute,
    /// Close: CloseComplete (swallowed when pgwarden injected it)
    Close {
        /// the client did not send it
        swallow: bool,
    },
    /// answered by pgwarden itself when its turn comes
    Reply(Reply),
}

/// An answer pgwarden gives in place of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// these bytes, as they are (ParseComplete, CloseComplete, a NOTICE, an error)
    Bytes(Bytes),
    /// CommandComplete with this tag, then ReadyForQuery with the current status
    Done(&'static str),
}

impl Expect {
    /// True for entries the server skips after an error in the extended protocol.
    fn skipped_after_error(&self) -> bool {
        !matches!(self, Expect::Sync | Expect::Query | Expect::Function)
    }
}

/// The queue itself.
#[derive(Debug, Default)]
pub struct Expected {
    queue: VecDeque<Expect>,
}

impl Expected {
    /// Records a request sent (or answered locally) after all the others.
    pub fn push(&mut self, e: Expect) {
        self.queue.push_back(e);
    }

    /// The oldest request still unanswered.
    pub fn head(&self) -> Option<&Expect> {
        self.queue.front()
    }

    /// The oldest request is fully answered.
    pub fn pop(&mut self) -> Option<Expect> {
        self.queue.pop_front()
    }

    /// Nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Requests still owed.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Requests the client is owed an answer for (what a lost connection must answer).
    pub fn answers_owed(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| matches!(e, Expect::Query | Expect::Sync | Expect::Function))
            .count()
    }

    /// After an error in the extended protocol the server ignores everything up to the
    /// next Sync: those entries go, and are returned so that their effects can be undone.
    pub fn skip_to_sync(&mut self) -> Vec<Expect> {
        let mut skipped = Vec::new();
        while self.queue.front().is_some_and(Expect::skipped_after_error) {
            skipped.extend(self.queue.pop_front());
        }
        skipped
    }

    /// COPY FROM STDIN started by an Execute: the server ignores the Sync the client
    /// sent right after it, which therefore gets no answer.
    pub fn drop_next_sync(&mut self) {
        if let Some(i) = self.queue.iter().skip(1).position(|e| *e == Expect::Sync) {
            self.queue.remove(i + 1);
        }
    }

    /// Forgets everything (the connection is being discarded).
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_skips_to_the_next_sync() {
        let mut q = Expected::default();
        for e in [
            Expect::Bind(None),
            Expect::Execute,
            Expect::Reply(Reply::Done("X")),
            Expect::Sync,
            Expect::Bind(None),
        ] {
            q.push(e);
        }
        assert_eq!(q.answers_owed(), 1);
        let skipped = q.skip_to_sync();
        assert_eq!(skipped.len(), 3);
        assert_eq!(q.head(), Some(&Expect::Sync));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn copy_in_drops_the_sync_after_the_execute() {
        let mut q = Expected::default();
        q.push(Expect::Execute);
        q.push(Expect::Sync);
        q.push(Expect::Query);
        q.drop_next_sync();
        assert_eq!(q.len(), 2);
        q.pop();
        assert_eq!(q.head(), Some(&Expect::Query));
    }
}
