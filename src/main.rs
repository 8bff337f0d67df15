//! The `reassigned` binary: parses the command line, sets up tracing and the
//! rustls crypto provider, and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reassigned::cli;
use reassigned::cli::generate::GenerateOptions;
use reassigned::config::ServeSettings;

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
        /// Print the resolved configuration as TOML and exit.
        #[arg(long)]
        dump_config: bool,
        #[command(flatten)]
        settings: Box<ServeSettings>,
    },
    /// Apply one manifest (snapshot or delta) to the Redis mirror.
    Import {
        /// Redis URL.
        #[arg(long, env = "REASSIGNED_REDIS")]
        redis: String,
        /// Prefix of every Redis key.
        #[arg(long, env = "REASSIGNED_REDIS_KEY_PREFIX", default_value = "rn")]
        redis_key_prefix: String,
        /// The manifest JSON file.
        manifest: PathBuf,
    },
    /// Apply every pending manifest of a directory to the Redis mirror, in sequence order.
    Sync {
        /// Redis URL.
        #[arg(long, env = "REASSIGNED_REDIS")]
        redis: String,
        /// Prefix of every Redis key.
        #[arg(long, env = "REASSIGNED_REDIS_KEY_PREFIX", default_value = "rn")]
        redis_key_prefix: String,
        /// The directory of manifests.
        dir: PathBuf,
    },
    /// Certificates for development.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write a realistic synthetic register (a snapshot, deltas and a query mix).
    Generate(GenerateOptions),
    /// Make dev certificates and a demo data set if missing, and serve them on
    /// 127.0.0.1:50051 with the embedded store.
    Demo {
        /// Where the demo keeps its certificates and data.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: std::net::SocketAddr,
        /// Records in the demo register.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A dev CA, a server certificate for localhost and two platform client certificates.
    Dev {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
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
                redis,
                redis_key_prefix,
                manifest,
            } => cli::import(&redis, &redis_key_prefix, &manifest).await,
            Command::Sync {
                redis,
                redis_key_prefix,
                dir,
            } => cli::sync(&redis, &redis_key_prefix, &dir).await,
            Command::Certs {
                command: CertsCommand::Dev { out, force },
            } => cli::certs_dev(&out, force),
            Command::Generate(options) => cli::generate_cmd(&options),
            Command::Demo { dir, listen, records } => cli::demo(&dir, listen, records).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
