//! Tumbling windows over corrected event time. Pure.

/// A tumbling window length.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Window {
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
}

/// The start of a window, in milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct WindowStart(pub i64);

impl Window {
    /// Every window length, shortest first.
    pub const ALL: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

    /// Returns the window's length in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
        }
    }

    /// Returns the short name used in keys and APIs (`1m`, `1h`, `1d`).
    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "1m",
            Window::Hour => "1h",
            Window::Day => "1d",
        }
    }

    /// Reads a short name (`1m`, `1h`, `1d`).
    pub fn from_name(name: &str) -> Option<Self> {
        Window::ALL.into_iter().find(|w| w.name() == name)
    }

    /// Returns the start of the window holding `event_time_ms`, also before 1970.
    pub fn start_of(self, event_time_ms: i64) -> WindowStart {
        WindowStart(event_time_ms.div_euclid(self.millis()) * self.millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_time_falls_in_exactly_the_window_that_starts_at_or_before_it(t in -10_000_000_000_000i64..10_000_000_000_000i64) {
            for window in Window::ALL {
                let WindowStart(start) = window.start_of(t);
                prop_assert!(start <= t && t < start + window.millis());
                prop_assert_eq!(start.rem_euclid(window.millis()), 0);
            }
        }
    }

    #[test]
    fn known_windows() {
        // 2026-11-20T09:14:03.120Z
        let t = 1_795_166_043_120;
        assert_eq!(Window::Minute.start_of(t), WindowStart(1_795_166_040_000));
        assert_eq!(Window::Hour.start_of(t), WindowStart(1_795_165_200_000));
        assert_eq!(Window::Day.start_of(t), WindowStart(1_795_132_800_000));
        assert_eq!(Window::Minute.start_of(-1), WindowStart(-60_000));
    }
}
