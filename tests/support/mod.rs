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

/// One test per store: `per_store_tests!(module => argument, ...; f, g)`
/// writes, for every `module`, a `mod module` holding a multi-threaded
/// `#[tokio::test]` per function that runs `super::f(argument).await`.
/// `argument` is an expression read inside `module` (so `super::Kind::Redis`,
/// `super::Embedded::start()`) and evaluated afresh by every test.
#[allow(unused_macros)]
macro_rules! per_store_tests {
    ($module:ident => $arg:expr $(, $more:ident => $more_arg:expr)* $(,)?; $($name:ident),* $(,)?) => {
        mod $module {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($arg).await
            })*
        }
        $crate::support::per_store_tests!($($more => $more_arg),*; $($name),*);
    };
    ($(,)?; $($name:ident),* $(,)?) => {};
}
#[allow(unused_imports)]
pub(crate) use per_store_tests;
