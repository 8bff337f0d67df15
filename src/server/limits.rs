//! Process limits a server needs: every TLS connection, pending handshake
//! and Redis connection is a file descriptor, and an idle-socket flood is
//! met by holding thousands of them (see [`crate::server::tls`]).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft limit on open files to the hard limit (as Go's runtime
/// does), so a flood of idle sockets meets the accept loop's shedding
/// rather than `EMFILE`. Returns the soft limit in force afterwards
/// (`None`: unlimited); a refusal keeps the old limit.
pub fn raise_open_files_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum;
        }
    }
    limit.current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let soft = raise_open_files_limit();
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(soft, limit.current);
        assert_eq!(limit.current, limit.maximum);
    }
}
