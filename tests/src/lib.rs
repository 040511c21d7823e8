//! Host-level test harness (in progress).
