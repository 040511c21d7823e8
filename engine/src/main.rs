//! The `segue` command-line program.
fn main() {}
