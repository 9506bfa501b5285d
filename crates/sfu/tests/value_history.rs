//! The unit tests of str0m's windowed sum of sent bytes (str0m patch 31, in
//! `vendor/str0m/src/util/value_history.rs`). The vendored str0m's own test suite needs
//! development dependencies and files that are not vendored, so its file is compiled here.

#[allow(dead_code)]
#[path = "../../../vendor/str0m/src/util/value_history.rs"]
mod value_history;
