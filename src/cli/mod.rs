//! Operator commands: certificates and other tooling behind `reassigned <command>`.
pub mod certs;
pub mod generate;
// LEAD: commands wired in once import/embedded/generate land
