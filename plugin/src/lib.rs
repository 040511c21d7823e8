//! Segue plugin (in progress).
