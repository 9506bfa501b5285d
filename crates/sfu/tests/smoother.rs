//! The unit tests of str0m's bandwidth-estimate smoother (str0m patch 10, in
//! `vendor/str0m/src/bwe/smoother.rs`). The vendored str0m's own test suite needs development
//! dependencies and files that are not vendored, so its file is compiled here instead, with
//! the one type it takes from str0m.

mod rtp_ {
    pub use str0m::bwe::Bitrate;
}

#[allow(dead_code)]
#[path = "../../../vendor/str0m/src/bwe/smoother.rs"]
mod smoother;
