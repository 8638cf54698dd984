//! The `vfio-multifd` command.
fn main() {}
