//! `remora-injector`: the admission webhook (`serve`) and offline injection (`inject`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use remora_injector::offline::{self, InjectArgs};
use remora_injector::server::{self, ServeArgs};
use remora_serving::logging::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "remora-injector",
    version,
    about,
    after_help = "Examples:\n  \
      remora-injector serve --tls-cert tls.crt --tls-key tls.key\n  \
      remora-injector inject -f deployment.yaml | kubectl apply -f -"
)]
struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `remora_injector=debug,info`.
    // Shown after each command's own flags.
    #[arg(
        long,
        global = true,
        env = "REMORA_LOG_LEVEL",
        default_value = "info",
        display_order = 1000
    )]
    log_level: String,

    /// Log line format, written to standard error [default: json for serve, plain for inject].
    #[arg(
        long,
        global = true,
        env = "REMORA_LOG_FORMAT",
        value_enum,
        display_order = 1001
    )]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the mutating admission webhook over HTTPS.
    #[command(
        long_about = "Serve the mutating admission webhook over HTTPS (HTTP/1.1 and HTTP/2).\n\n\
        POST /inject answers for namespaces labelled remora.io/inject=enabled: every new pod is \
        injected unless it opts out (annotation or label remora.io/inject: \"false\").\n\n\
        POST /inject/opt-in answers for every other namespace: only a pod that opts in \
        (remora.io/inject: \"true\") is injected.\n\n\
        GET /healthz, /readyz and /metrics (Prometheus text) are served on the same port. The \
        certificate and key are re-read when their files change, without a restart."
    )]
    Serve(ServeArgs),
    /// Inject the pod templates of manifests read from a file or stdin; YAML to stdout.
    #[command(
        long_about = "Inject the pod templates of manifests read from a file or stdin, and \
        write the manifests as YAML to standard output, ready for `kubectl apply -f -`.\n\n\
        Reads YAML or JSON: Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, \
        ReplicationController, Job, CronJob, a List of them, several documents separated by ---. \
        Every pod template is injected exactly as the webhook's /inject path would (unless it \
        opts out with remora.io/inject: \"false\"); other kinds and already-injected templates \
        come out unchanged. Warnings go to standard error, among them one for each object of \
        another kind that carries a pod template (a custom resource's, say), which is not \
        injected. A document that cannot be parsed, or an invalid remora.io/ \
        annotation, stops the run with exit status 1 and nothing written."
    )]
    Inject(InjectArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            logging::init(
                &cli.log_level,
                cli.log_format.unwrap_or(LogFormat::Json),
                "remora_injector=debug,info",
            )?;
            // A worker per core. One worker spent 8-28% less CPU per review at 1000/s (no idle
            // sibling woken per request), but every review then waits behind the one being
            // reviewed, and full-speed reviews/s fell from about 17,000 to 10,000-11,500 (bench
            // README, "On the firecracker VM").
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(server::serve(args))?;
        }
        Command::Inject(args) => {
            logging::init(
                &cli.log_level,
                cli.log_format.unwrap_or(LogFormat::Plain),
                "remora_injector=debug,info",
            )?;
            offline::run(&args)?;
        }
    }
    Ok(())
}

/// The error with its causes; most of the crate's messages already end with their cause, which
/// is then not repeated.
fn report(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("remora-injector: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}
