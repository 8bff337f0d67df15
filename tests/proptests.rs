//! Property tests of everything that parses outside input: the E.164 and
//! date parsers, the manifest and CSV readers, and the `authorization`
//! header / JWT parser of the token verifier. On arbitrary input each must
//! not panic and must give the right kind of error; where natural, what it
//! accepts round-trips.
//!
//! 256 cases per property by default (a few seconds in all); run longer
//! with `PROPTEST_CASES=100000 cargo test --release --test proptests`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use reassigned::cli::token::{IssuerKey, KeyAlg};
use reassigned::domain::{Date, DateError, NumberError, PhoneNumber};
use reassigned::identity::Platform;
use reassigned::import::{ImportError, Manifest, NoProgress, read_records};
use reassigned::server::token::{Confirmation, TokenClaims, TokenError, TokenVerifier};
use sha2::{Digest, Sha256};

/// What strict E.164 parsing must answer for `text`, by the README's rule
/// `^\+[1-9][0-9]{4,14}$` and the order of its checks.
fn expected_number(text: &str) -> Result<(), NumberError> {
    let Some(digits) = text.strip_prefix('+') else {
        return Err(if text.is_empty() {
            NumberError::Empty
        } else {
            NumberError::MissingPlus
        });
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::NotDigits);
    }
    if !(5..=15).contains(&digits.len()) {
        return Err(NumberError::Length(digits.len()));
    }
    if digits.starts_with('0') {
        return Err(NumberError::LeadingZero);
    }
    Ok(())
}

proptest! {
    #[test]
    fn e164_parser_answers_by_the_rule(text in "\\PC{0,20}|\\+[0-9]{0,17}|\\+[0-9 ()-]{3,16}") {
        let got = PhoneNumber::parse(&text).map(|_| ());
        prop_assert_eq!(got, expected_number(&text));
    }

    #[test]
    fn e164_numbers_round_trip(text in "\\+[1-9][0-9]{4,14}") {
        let number = PhoneNumber::parse(&text).expect("valid E.164");
        prop_assert_eq!(number.to_string(), text.clone());
        prop_assert_eq!(PhoneNumber::from_value(number.value()), Some(number));
        prop_assert_eq!(number.digits(), text.len() - 1);
    }

    #[test]
    fn date_parser_never_panics_and_names_the_problem(text in "\\PC{0,12}|[0-9-]{8,12}") {
        match Date::parse(&text) {
            Ok(date) => prop_assert_eq!(date.to_string(), text.clone()),
            Err(DateError::Empty) => prop_assert!(text.is_empty()),
            Err(DateError::Format) => {
                let b = text.as_bytes();
                let shaped = b.len() == 10
                    && b[4] == b'-'
                    && b[7] == b'-'
                    && [0, 1, 2, 3, 5, 6, 8, 9].iter().all(|&i| b[i].is_ascii_digit());
                prop_assert!(!shaped, "{text:?} is shaped YYYY-MM-DD");
            }
            Err(DateError::Impossible) => prop_assert_eq!(text.len(), 10),
        }
    }

    #[test]
    fn dates_round_trip_and_impossible_days_are_named(y in 0u32..10000, m in 0u32..14, d in 0u32..33) {
        let text = format!("{y:04}-{m:02}-{d:02}");
        match Date::from_ymd(y as i32, m, d) {
            Some(date) => {
                prop_assert_eq!(Date::parse(&text), Ok(date));
                prop_assert_eq!(date.to_string(), text);
                prop_assert_eq!(date.ymd(), (y as i32, m, d));
            }
            None => prop_assert_eq!(Date::parse(&text), Err(DateError::Impossible)),
        }
    }
}

/// A directory per test thread for the reader properties' files.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

/// Today, fixed, for manifests.
fn today() -> Date {
    Date::parse("2026-11-30").expect("date")
}

/// A manifest JSON value: valid, or with fields replaced by arbitrary JSON.
fn manifest_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!("2026-11-01")),
        Just(serde_json::json!(["+1", "+86"])),
    ];
    let fields = [
        "kind",
        "sequence",
        "as_of",
        "coverage_start",
        "covered_prefixes",
        "data",
        "records",
        "sha256",
        "extra",
    ];
    proptest::collection::btree_map(proptest::sample::select(fields.to_vec()), leaf, 0..5).prop_map(
        |changes: BTreeMap<&str, serde_json::Value>| {
            let mut manifest = serde_json::json!({
                "kind": "snapshot", "sequence": 1, "as_of": "2026-11-01",
                "coverage_start": "2021-01-27", "covered_prefixes": ["+1"],
                "data": "s1.csv", "records": 0,
                "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            });
            for (field, value) in changes {
                manifest[field] = value;
            }
            manifest
        },
    )
}

proptest! {
    #[test]
    fn manifest_reader_refuses_arbitrary_bytes_as_a_manifest_error(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let path = scratch().join(format!("bytes-{:?}.json", std::thread::current().id()));
        std::fs::write(&path, &bytes).expect("write");
        match Manifest::load_as_of_today(&path, today()) {
            Ok(_) => {} // (vanishingly unlikely: a valid manifest)
            Err(ImportError::Manifest(p, reason)) => {
                prop_assert_eq!(p, path);
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "expected a manifest error, got {other}"),
        }
    }

    #[test]
    fn manifest_reader_checks_every_field(json in manifest_json()) {
        let path = scratch().join(format!("fields-{:?}.json", std::thread::current().id()));
        std::fs::write(&path, serde_json::to_vec(&json).expect("json")).expect("write");
        match Manifest::load_as_of_today(&path, today()) {
            Ok(manifest) => {
                // Accepted: it says what the JSON says.
                prop_assert_eq!(Some(manifest.sequence), json["sequence"].as_u64());
                prop_assert_eq!(Some(manifest.records), json["records"].as_u64());
                prop_assert_eq!(Some(manifest.data.as_str()), json["data"].as_str());
                prop_assert!(manifest.sequence > 0);
            }
            Err(ImportError::Manifest(_, reason)) => prop_assert!(!reason.is_empty()),
            Err(other) => prop_assert!(false, "expected a manifest error, got {other}"),
        }
    }
}

/// Writes a snapshot manifest and its data file holding `header` + `body`
/// (with its true checksum and `records`); returns the loaded manifest.
fn data_file(name: &str, body: &[u8], records: u64) -> Manifest {
    let dir = scratch();
    let mut data = b"phone_number,disconnect_date\n".to_vec();
    data.extend_from_slice(body);
    std::fs::write(dir.join(format!("{name}.csv")), &data).expect("write data");
    let manifest = serde_json::json!({
        "kind": "snapshot", "sequence": 1, "as_of": "2026-11-01",
        "coverage_start": "2021-01-27", "covered_prefixes": ["+1"],
        "data": format!("{name}.csv"), "records": records,
        "sha256": hex::encode(Sha256::digest(&data)),
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write manifest");
    Manifest::load_as_of_today(&path, today()).expect("a valid manifest")
}

fn lines(body: &[u8]) -> u64 {
    body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() as u64
}

proptest! {
    #[test]
    fn csv_reader_refuses_arbitrary_rows_as_a_data_error(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..400),
            proptest::collection::vec(proptest::sample::select(b"+0123456789,-\n\r \xff".to_vec()), 0..400),
        ]
    ) {
        let name = format!("rows-{:?}", std::thread::current().id());
        let manifest = data_file(&name, &body, lines(&body));
        match read_records(&manifest, &mut NoProgress) {
            Ok(records) => prop_assert!(records.len() as u64 <= lines(&body)),
            Err(ImportError::Data { problems, .. }) => prop_assert!(!problems.is_empty()),
            Err(other) => prop_assert!(false, "expected a data error, got {other}"),
        }
    }

    #[test]
    fn csv_rows_round_trip(
        rows in proptest::collection::btree_map("\\+1[2-9][0-9]{9}", (2021i32..2026, 1u32..13, 1u32..29), 0..50)
    ) {
        let body: String = rows
            .iter()
            .map(|(n, (y, m, d))| format!("{n},{y:04}-{m:02}-{d:02}\n"))
            .collect();
        let name = format!("valid-{:?}", std::thread::current().id());
        let manifest = data_file(&name, body.as_bytes(), rows.len() as u64);
        let records = read_records(&manifest, &mut NoProgress).expect("valid rows");
        prop_assert_eq!(records.len(), rows.len());
        for (n, (y, m, d)) in &rows {
            let number = PhoneNumber::parse(n).expect("number");
            prop_assert_eq!(records.get(number), Date::from_ymd(*y, *m, *d));
        }
    }
}

/// The verifier (an ES256 key with kid `k`), its key, and a platform.
fn verifier() -> &'static (TokenVerifier, IssuerKey, Platform) {
    static V: OnceLock<(TokenVerifier, IssuerKey, Platform)> = OnceLock::new();
    V.get_or_init(|| {
        let (key, verifier) = support::server::key_and_verifier(scratch(), KeyAlg::Es256);
        let platform = Platform {
            id: "spiffe://dev.reassigned/p".into(),
            cert_sha256: [7; 32],
        };
        (verifier, key, platform)
    })
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

proptest! {
    #[test]
    fn authorization_header_without_bearer_is_not_bearer(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (verifier, _, platform) = verifier();
        let bearer = value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ");
        let got = verifier.verify(Some(&value), platform);
        prop_assert!(got.is_err());
        if !bearer && !value.trim_ascii_start().to_ascii_lowercase().starts_with(b"bearer ") {
            prop_assert_eq!(got, Err(TokenError::NotBearer));
        }
    }

    #[test]
    fn arbitrary_bearer_tokens_are_malformed_or_unknown(
        scheme in "(?i:bearer)",
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..5),
        raw in "\\PC{0,80}",
        use_raw in any::<bool>(),
    ) {
        let (verifier, _, platform) = verifier();
        let token = if use_raw {
            raw
        } else {
            parts.iter().map(|p| b64(p)).collect::<Vec<_>>().join(".")
        };
        let got = verifier.verify(Some(format!("{scheme} {token}").as_bytes()), platform);
        prop_assert!(
            matches!(got, Err(TokenError::Malformed | TokenError::UnknownKey | TokenError::NotBearer)),
            "{got:?}"
        );
    }

    #[test]
    fn a_known_kid_with_garbage_claims_or_signature_is_refused(
        alg in proptest::sample::select(vec!["ES256", "EdDSA", "HS256", "none", "RS256"]),
        payload in proptest::collection::vec(any::<u8>(), 0..120),
        signature in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let (verifier, _, platform) = verifier();
        let header = b64(format!(r#"{{"alg":"{alg}","kid":"k","typ":"JWT"}}"#).as_bytes());
        let token = format!("Bearer {header}.{}.{}", b64(&payload), b64(&signature));
        let got = verifier.verify(Some(token.as_bytes()), platform);
        prop_assert!(
            matches!(
                got,
                Err(TokenError::Malformed | TokenError::BadSignature | TokenError::WrongAlgorithm)
            ),
            "{got:?}"
        );
    }

    #[test]
    fn valid_tokens_round_trip_their_scopes(
        scopes in proptest::collection::vec("[a-z:]{1,12}", 0..5),
        spaces in "[ ]{1,3}",
    ) {
        let (verifier, key, platform) = verifier();
        let now = reassigned::cli::token::now_secs();
        let claims = TokenClaims {
            iss: "i".into(),
            aud: "a".into(),
            sub: platform.id.clone(),
            iat: now,
            nbf: now,
            exp: now + 600,
            scope: scopes.join(&spaces),
            cnf: Confirmation::for_cert_sha256(&platform.cert_sha256),
        };
        let token = key.mint(&claims).expect("mint");
        let granted = verifier.verify(Some(format!("Bearer {token}").as_bytes()), platform).expect("valid");
        prop_assert_eq!(granted.iter().collect::<Vec<_>>(), scopes.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
