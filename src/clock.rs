//! The monotonic clock as a plain count of nanoseconds, for the transaction path.
//!
//! Every transaction reads the clock twice and measures four spans with it (its
//! wait, its run, a connection's age and its return date). `std::time::Instant`
//! keeps seconds and nanoseconds apart, so each span is a borrow-and-normalise
//! subtraction; a [`Tick`] is one integer, so a span is one instruction and the
//! pools store a reading in an atomic as is.

use std::time::Duration;

/// A reading of the monotonic clock (`CLOCK_MONOTONIC`, as `Instant`), in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(u64);

impl Tick {
    /// The clock now.
    pub fn now() -> Tick {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write into; CLOCK_MONOTONIC exists on
        // every Linux, so the call cannot fail (the vDSO answers it without a syscall).
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Tick(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// The reading as nanoseconds, for an atomic to hold.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// A reading an atomic held.
    pub fn from_nanos(nanos: u64) -> Tick {
        Tick(nanos)
    }

    /// The time from `earlier` to this reading; zero if `earlier` is later.
    pub fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.nanos_since(earlier))
    }

    /// [`Tick::since`] in nanoseconds, to compare with a limit kept by [`nanos`]
    /// without splitting both into seconds and nanoseconds first.
    pub fn nanos_since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// [`Tick::since`] in seconds, as histograms take it.
    pub fn secs_since(self, earlier: Tick) -> f64 {
        self.nanos_since(earlier) as f64 * 1e-9
    }

    /// The reading `d` after this one (saturating).
    pub fn after(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(nanos(d)))
    }

    /// The time since this reading.
    pub fn elapsed(self) -> Duration {
        Tick::now().since(self)
    }
}

/// A duration as nanoseconds, saturating (at five centuries), to compare with spans.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_advance_with_the_standard_clock() {
        let std_start = std::time::Instant::now();
        let start = Tick::now();
        std::thread::sleep(Duration::from_millis(20));
        let span = Tick::now().since(start);
        let std_span = std_start.elapsed();
        assert!(span >= Duration::from_millis(20), "{span:?}");
        // Both read CLOCK_MONOTONIC: the spans differ only by the reads' own order.
        assert!(span <= std_span, "{span:?} > {std_span:?}");
        assert!((Tick::now().secs_since(start) - span.as_secs_f64()) >= 0.0);
    }

    #[test]
    fn a_span_from_a_later_reading_is_zero() {
        let t = Tick::from_nanos(5_000);
        assert_eq!(Tick::from_nanos(4_000).since(t), Duration::ZERO);
        assert_eq!(t.since(Tick::from_nanos(4_000)), Duration::from_micros(1));
        assert_eq!(Tick::from_nanos(4_000).secs_since(t), 0.0);
        assert_eq!(t.nanos_since(Tick::from_nanos(4_000)), 1_000);
        assert_eq!(Tick::from_nanos(4_000).nanos_since(t), 0);
    }
}
