//! The one table of the proto's gRPC methods ([`METHODS`]): path, the access
//! a call needs, the metrics label and the streaming kind. The auth layer
//! (`server::auth`) checks scopes from it and refuses any path it does not
//! know ([`route`]); the request metrics (`server::metrics`) label calls from
//! it. A unit test walks the services of the compiled proto and
//! fails when a method is missing here (or listed here but gone).
//!
//! Also the one spelling of gRPC code names ([`code_name`]).

use tonic::Code;

use crate::identity::Scope;

/// What a call of a method needs beyond the connection's client certificate
/// (when the server runs with tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A valid token bound to the certificate that grants this scope.
    Scope(Scope),
    /// A valid token bound to the certificate, no particular scope.
    AnyToken,
}

/// How a method streams, as declared in the proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses.
    Server,
    /// A stream of requests, one response.
    Client,
    /// Streams both ways.
    Bidi,
}

/// One gRPC method of the `reassigned.v1` API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The HTTP/2 path: `/package.Service/Method`.
    pub path: &'static str,
    /// The `method` label of the request metrics.
    pub label: &'static str,
    /// What a call needs.
    pub access: Access,
    /// How it streams.
    pub streaming: Streaming,
}

/// Every method of every `reassigned.v1` service. A path not listed here (and
/// not exempt, see [`EXEMPT_PREFIXES`]) is refused by the auth layer.
pub const METHODS: [Method; 11] = [
    Method {
        path: "/reassigned.v1.ReassignedNumbers/CheckNumber",
        label: "CheckNumber",
        access: Access::Scope(Scope::NumbersCheck),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.ReassignedNumbers/BatchCheckNumbers",
        label: "BatchCheckNumbers",
        access: Access::Scope(Scope::NumbersBatch),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.ReassignedNumbers/StreamCheckNumbers",
        label: "StreamCheckNumbers",
        access: Access::Scope(Scope::NumbersBatch),
        streaming: Streaming::Bidi,
    },
    Method {
        path: "/reassigned.v1.ReassignedNumbers/GetMirrorStatus",
        label: "GetMirrorStatus",
        access: Access::Scope(Scope::MirrorRead),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.ReassignedNumbers/GetSigningKeys",
        label: "GetSigningKeys",
        // Open to any authenticated platform on purpose: it publishes the
        // receipt signer's public keys (JWKS), which every platform that
        // holds receipts needs to verify them, whatever scopes its token
        // grants. It reveals nothing secret and reads no store.
        access: Access::AnyToken,
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.DisconnectionFeed/PublishDisconnections",
        label: "PublishDisconnections",
        access: Access::Scope(Scope::RegisterWrite),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.DisconnectionFeed/RetractDisconnection",
        label: "RetractDisconnection",
        access: Access::Scope(Scope::RegisterWrite),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.Watchlist/AddWatches",
        label: "AddWatches",
        access: Access::Scope(Scope::WatchWrite),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.Watchlist/RemoveWatches",
        label: "RemoveWatches",
        access: Access::Scope(Scope::WatchWrite),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.Watchlist/CountWatches",
        label: "CountWatches",
        access: Access::Scope(Scope::WatchRead),
        streaming: Streaming::Unary,
    },
    Method {
        path: "/reassigned.v1.Watchlist/WatchDisconnections",
        label: "WatchDisconnections",
        access: Access::Scope(Scope::WatchRead),
        streaming: Streaming::Server,
    },
];

/// gRPC path prefixes that may be called without a platform identity and
/// without a token: health and reflection. They still need a completed TLS
/// handshake, which requires a client certificate signed by a trusted CA.
pub const EXEMPT_PREFIXES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// Exempt methods counted under their own metrics label.
pub const EXEMPT_LABELS: [(&str, &str); 2] = [
    ("/grpc.health.v1.Health/Check", "HealthCheck"),
    ("/grpc.health.v1.Health/Watch", "HealthWatch"),
];

/// The metrics label of every other path.
pub const OTHER_LABEL: &str = "other";

/// Number of metrics labels: [`METHODS`], [`EXEMPT_LABELS`], then
/// [`OTHER_LABEL`].
pub const LABEL_COUNT: usize = METHODS.len() + EXEMPT_LABELS.len() + 1;

/// Where a request path leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A method of the API.
    Api(&'static Method),
    /// Health or reflection: no identity or token needed.
    Exempt,
    /// Nothing this server answers: refuse it.
    Unknown,
}

/// Where `path` leads.
pub fn route(path: &str) -> Route {
    if let Some(method) = METHODS.iter().find(|m| m.path == path) {
        Route::Api(method)
    } else if EXEMPT_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
        Route::Exempt
    } else {
        Route::Unknown
    }
}

/// The metrics label index of `path`, below [`LABEL_COUNT`].
pub fn label_index(path: &str) -> usize {
    if let Some(i) = METHODS.iter().position(|m| m.path == path) {
        return i;
    }
    match EXEMPT_LABELS.iter().position(|(p, _)| *p == path) {
        Some(i) => METHODS.len() + i,
        None => LABEL_COUNT - 1,
    }
}

/// The metrics label at `index` (see [`label_index`]).
pub fn label(index: usize) -> &'static str {
    let exempt = index.checked_sub(METHODS.len());
    match (METHODS.get(index), exempt.and_then(|i| EXEMPT_LABELS.get(i))) {
        (Some(method), _) => method.label,
        (None, Some((_, label))) => label,
        (None, None) => OTHER_LABEL,
    }
}

/// The canonical upper-case name of a gRPC code (`INVALID_ARGUMENT`), the one
/// spelling used by the API's per-check errors, the metrics and the CLI.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost::Message as _;

    use super::*;

    /// Every method of every `reassigned.v1` service in the compiled proto,
    /// by path, with its streaming kind.
    fn proto_methods() -> BTreeMap<String, Streaming> {
        let fds = prost_types::FileDescriptorSet::decode(crate::api::pb::FILE_DESCRIPTOR_SET)
            .expect("the build's descriptor set decodes");
        let mut methods = BTreeMap::new();
        for file in fds.file.iter().filter(|f| f.package() == "reassigned.v1") {
            for service in &file.service {
                for method in &service.method {
                    let streaming = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => Streaming::Unary,
                        (false, true) => Streaming::Server,
                        (true, false) => Streaming::Client,
                        (true, true) => Streaming::Bidi,
                    };
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    methods.insert(path, streaming);
                }
            }
        }
        methods
    }

    #[test]
    fn the_table_lists_exactly_the_protos_methods() {
        let proto = proto_methods();
        assert!(
            !proto.is_empty(),
            "the descriptor set holds reassigned.v1 services"
        );
        let table: BTreeMap<String, Streaming> =
            METHODS.iter().map(|m| (m.path.to_owned(), m.streaming)).collect();
        assert_eq!(table.len(), METHODS.len(), "a path is listed twice");
        for (path, streaming) in &proto {
            assert_eq!(
                table.get(path),
                Some(streaming),
                "{path} is in the proto but not in api::methods::METHODS (or with another streaming kind): \
                 add it with its scope"
            );
        }
        for path in table.keys() {
            assert!(
                proto.contains_key(path),
                "{path} is in METHODS but not in the proto"
            );
        }
    }

    #[test]
    fn labels_are_unique_and_indexed() {
        let labels: Vec<&str> = (0..LABEL_COUNT).map(label).collect();
        let mut unique = labels.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), LABEL_COUNT, "{labels:?}");
        for m in &METHODS {
            assert_eq!(label(label_index(m.path)), m.label);
        }
        assert_eq!(label(label_index("/grpc.health.v1.Health/Watch")), "HealthWatch");
        assert_eq!(label(label_index("/x.Y/Z")), OTHER_LABEL);
    }

    #[test]
    fn unknown_paths_are_not_exempt() {
        assert_eq!(
            route("/reassigned.v1.ReassignedNumbers/NewMethod"),
            Route::Unknown
        );
        assert_eq!(route("/grpc.health.v1.HealthX/Check"), Route::Unknown);
        assert_eq!(
            route("/reassigned.v1.ReassignedNumbers/CheckNumber/"),
            Route::Unknown
        );
        assert_eq!(route("/grpc.health.v1.Health/Check"), Route::Exempt);
        assert!(matches!(
            route("/reassigned.v1.ReassignedNumbers/GetSigningKeys"),
            Route::Api(Method {
                access: Access::AnyToken,
                ..
            })
        ));
    }

    #[test]
    fn code_names_are_the_grpc_spelling() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
