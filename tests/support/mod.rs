//! Shared test support. Each integration test file that needs it says
//! `mod support;`.

pub mod redis;
pub mod redis_cluster;

pub mod bin;
pub mod log;
pub mod poll;
pub mod register;
pub mod server;
pub mod writes;
