//! The `reassigned` binary: parses the command line, sets up tracing and the
//! rustls crypto provider, and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reassigned::cli;
use reassigned::cli::bench::{self, BenchOptions};
use reassigned::cli::bench_bare::{self, BareOptions};
use reassigned::cli::generate::GenerateOptions;
use reassigned::config::{RedisTarget, ServeSettings};

/// A gRPC mirror of a national register of reassigned phone numbers.
#[derive(Parser)]
#[command(name = "reassigned", version, about)]
struct Cli {
    /// Log format on stderr: `text` or `json`. Levels via REASSIGNED_LOG (e.g. `info,reassigned=debug`).
    #[arg(long, global = true, env = "REASSIGNED_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API over mutual TLS.
    Serve {
        /// A TOML file of settings (same names as the flags, with `_`).
        #[arg(long, env = "REASSIGNED_CONFIG")]
        config: Option<PathBuf>,
        /// Print the resolved settings (defaults written out) as a TOML config
        /// file that `--config` reads back unchanged, and exit.
        #[arg(long)]
        dump_config: bool,
        #[command(flatten)]
        settings: Box<ServeSettings>,
    },
    /// Apply one manifest (snapshot or delta) to the Redis mirror.
    ///
    /// SIGTERM or SIGINT stops it cleanly (rolled back or finished, lock
    /// released) with exit status 143.
    Import {
        #[command(flatten)]
        mirror: MirrorArgs,
        /// The manifest JSON file.
        manifest: PathBuf,
        #[command(flatten)]
        guard: ShrinkGuard,
    },
    /// Apply every pending manifest of a directory to the Redis mirror, in sequence order.
    ///
    /// SIGTERM or SIGINT stops it cleanly before the next file (the current one
    /// rolled back or finished, lock released) with exit status 143.
    Sync {
        #[command(flatten)]
        mirror: MirrorArgs,
        /// The directory of manifests.
        dir: PathBuf,
        #[command(flatten)]
        guard: ShrinkGuard,
        /// Keep running: sync again this long after each run (e.g. `1h`,
        /// `10m`); a failed run is logged and retried at the next. SIGTERM
        /// between runs exits 0.
        #[arg(long, env = "REASSIGNED_SYNC_EVERY", value_parser = bench::parse_duration)]
        every: Option<std::time::Duration>,
        #[command(flatten)]
        metrics: cli::SyncMetricsArgs,
    },
    /// Compare the Redis mirror with the register files it was built from.
    ///
    /// Compares the record count and a checksum per bucket; exits non-zero,
    /// listing the differing buckets, if they differ.
    Verify {
        #[command(flatten)]
        mirror: MirrorArgs,
        /// The directory of manifests.
        dir: PathBuf,
    },
    /// Report and remove orphaned generations of the Redis mirror.
    ///
    /// Orphaned: bucket keys and filter chunks of generations neither current
    /// nor used by a live import.
    Gc {
        #[command(flatten)]
        mirror: MirrorArgs,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Certificates for development.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write a realistic synthetic register (a snapshot, deltas and a query mix).
    Generate(GenerateOptions),
    /// Token issuer keys for development.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit trail of answers.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Signed receipts of answers.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
    },
    /// Bearer tokens for development.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Probe a server: exit 0 when ready, 1 otherwise (for scripts and
    /// Docker HEALTHCHECK). `--admin`: the admin listener's `/readyz` over
    /// plain HTTP; else the gRPC health service over mutual TLS.
    Health(cli::health::HealthOptions),
    /// Load-test a server over mutual TLS (throughput, latency percentiles, errors).
    Bench(Box<BenchOptions>),
    /// Publish disconnections as an operator from a CSV file
    /// (`event_id,phone_number,disconnect_date`), in batches; prints a
    /// summary and exits non-zero if any item was refused.
    Publish(Box<cli::publish::PublishOptions>),
    /// Serve fixed answers without a store, over the same TLS and auth layer:
    /// the framework's ceiling for benchmarks.
    #[command(hide = true)]
    BenchBare(BareOptions),
    /// A platform's watch list (numbers bound to its accounts): add or
    /// remove a file of numbers, or count the list.
    Watchlist {
        #[command(subcommand)]
        command: WatchlistCommand,
    },
    /// Print the disconnection events of the caller's watch list as JSON
    /// lines, keeping the cursor in a file (resumes where it stopped).
    Watch(Box<cli::watch::WatchOptions>),
    /// Make dev certificates and a demo data set if missing, and serve them on
    /// 127.0.0.1:50051 with the embedded store.
    Demo {
        /// Where the demo keeps its certificates and data.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: std::net::SocketAddr,
        /// Address of the REST face (CAMARA Number Recycling, JSON batches).
        #[arg(long, default_value = "127.0.0.1:8443")]
        rest_listen: std::net::SocketAddr,
        /// Records in the demo register.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
    },
}

/// `watchlist add|remove`: the summary, and an error if any line was refused.
async fn watchlist_file(
    client: &cli::client::ClientArgs,
    file: &std::path::Path,
    add: bool,
) -> anyhow::Result<()> {
    let summary = cli::watch::watchlist_file(client, file, add).await?;
    if cli::watch::print_summary(&summary, add) {
        Ok(())
    } else {
        anyhow::bail!("{} lines refused", summary.refused.len())
    }
}

/// Where the Redis mirror is (`import`, `sync`, `verify`, `gc`).
#[derive(clap::Args)]
struct MirrorArgs {
    /// Redis URL.
    #[arg(long, env = "REASSIGNED_REDIS", required_unless_present = "redis_cluster")]
    redis: Option<String>,
    /// Redis Cluster seed nodes, comma-separated (instead of --redis).
    #[arg(long, env = "REASSIGNED_REDIS_CLUSTER", conflicts_with = "redis")]
    redis_cluster: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "REASSIGNED_REDIS_KEY_PREFIX", default_value = reassigned::config::defaults::KEY_PREFIX)]
    redis_key_prefix: String,
}

impl MirrorArgs {
    /// The Redis (or cluster) to talk to and the key prefix.
    fn target(self) -> anyhow::Result<(RedisTarget, String)> {
        Ok((
            RedisTarget::from_flags(self.redis, self.redis_cluster)?,
            self.redis_key_prefix,
        ))
    }
}

/// The guard of `import` and `sync` against snapshots that wipe the mirror.
#[derive(clap::Args)]
struct ShrinkGuard {
    /// The largest share (0.0 to 1.0) of the mirror's records a snapshot may
    /// remove; a snapshot removing more, or empty, is refused.
    #[arg(long, env = "REASSIGNED_MAX_SHRINK", default_value_t = reassigned::import::DEFAULT_MAX_SHRINK)]
    max_shrink: f64,
    /// Apply a snapshot however much it shrinks the mirror.
    #[arg(long)]
    allow_shrink: bool,
}

impl ShrinkGuard {
    fn options(&self) -> anyhow::Result<reassigned::import::ImportOptions> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.max_shrink),
            "--max-shrink {} must be a share from 0.0 to 1.0 (e.g. 0.10 for 10%)",
            self.max_shrink
        );
        Ok(reassigned::import::ImportOptions {
            max_shrink: self.max_shrink,
            allow_shrink: self.allow_shrink,
        })
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// A token issuer key pair: `issuer.key` (PKCS#8 PEM, mode 0600) and
    /// `jwks.json` (its public key, for `serve --jwks`). Never overwrites.
    Generate {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Signature algorithm.
        #[arg(long, value_enum, default_value = "ES256")]
        alg: cli::token::KeyAlg,
        /// Key id (default: derived from the public key).
        #[arg(long)]
        kid: Option<String>,
        /// If `--out` already holds `jwks.json` and `issuer.key`, keep them
        /// and succeed without writing (a setup step run on every start).
        #[arg(long)]
        keep_existing: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write one platform's audit records between two UTC days (inclusive) as
    /// JSON lines on stdout. Records hold a keyed hash of the number, never
    /// the number.
    Export {
        /// Redis URL of the audit stream.
        #[arg(long, env = "REASSIGNED_AUDIT_REDIS")]
        redis: String,
        /// Key prefix (the stream is `{prefix}:audit`).
        #[arg(long, env = "REASSIGNED_REDIS_KEY_PREFIX", default_value = reassigned::config::defaults::KEY_PREFIX)]
        redis_key_prefix: String,
        /// The platform id (e.g. `spiffe://dev.reassigned/platform-a`).
        #[arg(long)]
        platform: String,
        /// First day, `YYYY-MM-DD` (UTC).
        #[arg(long)]
        from: String,
        /// Last day, `YYYY-MM-DD` (UTC).
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Check a receipt offline: its signature against a JWKS (the `jwks` of
    /// `GetSigningKeys`) and that it is about `--number`. Prints the claims
    /// as JSON; exits non-zero, saying why, on any mismatch.
    Verify {
        /// JWKS file with the service's receipt public keys.
        #[arg(long)]
        jwks: PathBuf,
        /// The number the receipt should be about (E.164).
        #[arg(long)]
        number: String,
        /// The receipt (compact JWS), or `-` to read it from stdin.
        receipt: String,
    },
    /// Print the public JWKS of a receipt key: keep it, and give it to
    /// `serve --receipt-retired-key FILE@NOT_AFTER` when the key is retired.
    Jwks {
        /// The receipt private key (PKCS#8 PEM), as given to `--receipt-key`.
        #[arg(long)]
        key: PathBuf,
        /// The key id, as given to `--receipt-kid` (default: derived from the key).
        #[arg(long)]
        kid: Option<String>,
    },
}

#[derive(Subcommand)]
enum WatchlistCommand {
    /// Add the numbers of a file (one E.164 number per line) to the
    /// caller's watch list; exits non-zero if any line is refused.
    Add {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        /// The numbers, one per line (`#` comments and empty lines skipped).
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove the numbers of a file from the caller's watch list; exits
    /// non-zero if any line is refused.
    Remove {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        /// The numbers, one per line.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print how many numbers the caller's watch list holds.
    Count {
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a bearer token bound to a platform's client certificate (RFC 8705).
    /// Issuer and audience default to `reassigned-dev` and `reassigned`.
    Mint(cli::token::MintOptions),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A dev CA, a server certificate for localhost (and `--san` names) and
    /// two platform client certificates.
    Dev {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// One more name (DNS name or IP address) for the server
        /// certificate, besides localhost, 127.0.0.1 and ::1; repeat for
        /// several (e.g. `--san server` for the compose service).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// If `--out` already holds a CA (`ca.pem`), keep everything there
        /// and succeed without writing (a setup step run on every start).
        #[arg(long, conflicts_with = "force")]
        keep_existing: bool,
    },
    /// One more client certificate signed by an existing CA (e.g. the
    /// `ca.pem` / `ca.key` of `certs dev`): `NAME.pem` and `NAME.key` in
    /// `--out`, identity `spiffe://dev.reassigned/NAME` (a platform or an
    /// operator). Never overwrites.
    Client {
        /// The platform's or operator's name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// The CA certificate (PEM).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA private key (PEM).
        #[arg(long)]
        ca_key: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke client certificates: write a CRL signed by the CA, keeping the
    /// serials already revoked by an existing CRL at `--out`.
    Revoke {
        /// The CA certificate (PEM).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA private key (PEM).
        #[arg(long)]
        ca_key: PathBuf,
        /// A certificate to revoke (PEM); repeat for several.
        #[arg(long = "cert", required = true)]
        certs: Vec<PathBuf>,
        /// The CRL file to write (PEM), e.g. the server's `--client-crl`.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli::init_tracing(&cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::from(2);
    }
    let open_files = reassigned::server::limits::raise_open_files_limit();
    tracing::debug!(?open_files, "open files limit");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                config,
                dump_config,
                settings,
            } => cli::serve(config, dump_config, *settings).await,
            Command::Import {
                mirror,
                manifest,
                guard,
            } => {
                async {
                    let (target, prefix) = mirror.target()?;
                    cli::import_with(&target, &prefix, &manifest, guard.options()?).await
                }
                .await
            }
            Command::Sync {
                mirror,
                dir,
                guard,
                every,
                metrics,
            } => {
                async {
                    let (target, prefix) = mirror.target()?;
                    cli::sync_observed(&target, &prefix, &dir, guard.options()?, every, &metrics).await
                }
                .await
            }
            Command::Verify { mirror, dir } => {
                async {
                    let (target, prefix) = mirror.target()?;
                    cli::verify(&target, &prefix, &dir).await
                }
                .await
            }
            Command::Gc { mirror, dry_run } => {
                async {
                    let (target, prefix) = mirror.target()?;
                    cli::gc(&target, &prefix, dry_run).await
                }
                .await
            }
            Command::Certs {
                command:
                    CertsCommand::Dev {
                        out,
                        force,
                        sans,
                        keep_existing,
                    },
            } => cli::certs_dev(&out, force, &sans, keep_existing),
            Command::Certs {
                command:
                    CertsCommand::Revoke {
                        ca_cert,
                        ca_key,
                        certs,
                        out,
                    },
            } => cli::certs::revoke(&ca_cert, &ca_key, &certs, &out).map(|_| ()),
            Command::Certs {
                command:
                    CertsCommand::Client {
                        name,
                        ca_cert,
                        ca_key,
                        out,
                    },
            } => cli::certs::client_cert_files(&ca_cert, &ca_key, &name, &out),
            Command::Generate(options) => cli::generate_cmd(&options),
            Command::Keys {
                command:
                    KeysCommand::Generate {
                        out,
                        keep_existing: true,
                        ..
                    },
            } if out.join(cli::token::JWKS_FILE).exists()
                && out.join(cli::token::ISSUER_KEY_FILE).exists() =>
            {
                eprintln!("kept the existing issuer key and JWKS in {}", out.display());
                Ok(())
            }
            Command::Keys {
                command: KeysCommand::Generate { out, alg, kid, .. },
            } => cli::token::generate_keys(&out, alg, kid.as_deref()).map(|key| {
                eprintln!(
                    "wrote {} (kid {}) and {} to {}",
                    cli::token::ISSUER_KEY_FILE,
                    key.kid(),
                    cli::token::JWKS_FILE,
                    out.display()
                );
            }),
            Command::Audit {
                command:
                    AuditCommand::Export {
                        redis,
                        redis_key_prefix,
                        platform,
                        from,
                        to,
                    },
            } => cli::audit::export_cmd(&redis, &redis_key_prefix, &platform, &from, &to)
                .await
                .map(|count| eprintln!("{count} records")),
            Command::Receipt {
                command:
                    ReceiptCommand::Verify {
                        jwks,
                        number,
                        receipt,
                    },
            } => cli::receipt::verify_cmd(&jwks, &number, &receipt).and_then(|claims| {
                println!("{}", serde_json::to_string_pretty(&claims)?);
                Ok(())
            }),
            Command::Receipt {
                command: ReceiptCommand::Jwks { key, kid },
            } => cli::receipt::jwks_cmd(&key, kid).map(|jwks| println!("{jwks}")),
            Command::Token {
                command: TokenCommand::Mint(options),
            } => cli::token::mint_cmd(&options).map(|token| println!("{token}")),
            Command::Health(options) => cli::health::probe(&options).await.map(|ok| println!("{ok}")),
            Command::Watchlist { command } => match command {
                WatchlistCommand::Add { client, file } => watchlist_file(&client, &file, true).await,
                WatchlistCommand::Remove { client, file } => watchlist_file(&client, &file, false).await,
                WatchlistCommand::Count { client } => cli::watch::watchlist_count(&client)
                    .await
                    .map(|n| println!("{n}")),
            },
            Command::Watch(options) => cli::watch::watch(&options).await.map(|n| eprintln!("{n} events")),
            Command::Bench(options) => bench::run(&options).await,
            Command::Publish(options) => cli::publish::run(&options).await,
            Command::BenchBare(options) => bench_bare::run_bare(&options).await,
            Command::Demo {
                dir,
                listen,
                rest_listen,
                records,
            } => cli::demo(&dir, listen, rest_listen, records).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
