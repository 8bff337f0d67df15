//! Compiles `proto/` with protox (no system `protoc`) and generates the tonic
//! code from the descriptor set, which is also written to `OUT_DIR` for server
//! reflection (`compile_fds` ignores `file_descriptor_set_path`).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/reassigned/v1/reassigned.proto";
    println!("cargo:rerun-if-changed=proto");
    git_sha();
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("reassigned_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, but a request that does not decode is
        // INVALID_ARGUMENT, not INTERNAL (src/api/codec.rs).
        .codec_path("crate::api::codec::ApiCodec")
        .compile_fds(fds)?;
    // The OTLP trace export (`server::trace`): prost's own codec.
    let otlp = protox::compile(["proto/otlp/trace_export.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(otlp)?;
    Ok(())
}

/// Sets `REASSIGNED_GIT_SHA` for the build info metric: the variable of the
/// same name if the build sets it (e.g. a container build without `.git`),
/// else `git rev-parse HEAD`, else `unknown`.
fn git_sha() {
    println!("cargo:rerun-if-env-changed=REASSIGNED_GIT_SHA");
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let sha = std::env::var("REASSIGNED_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // A label value: keep it to safe characters.
    let sha: String = sha
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    // Rebuild when HEAD moves (also in a worktree, whose .git is a file).
    for name in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=REASSIGNED_GIT_SHA={sha}");
}
