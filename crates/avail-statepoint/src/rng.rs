//! The seeded random stream (it lives in `avail-model`, shared with the scheduler).

pub use avail_model::rng::SplitMix64;
