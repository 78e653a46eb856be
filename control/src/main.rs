//! `remora-control`: discovery for remora's proxies over gRPC.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use remora_control::admin::{self, Health};
use remora_control::identity::ca::CaFiles;
use remora_control::identity::review::StaticTokens;
use remora_control::identity::{self, CaSlot, IdentityService, Reviewer};
use remora_control::metrics::Metrics;
use remora_control::server::{self, Hub};
use remora_control::watch;
use remora_serving::logging::{self, LogFormat};
use remora_serving::tls::{self, CertReloader, CertResolver, TlsFiles};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Parser)]
#[command(
    name = "remora-control",
    version,
    about,
    after_help = "Examples:\n  \
      remora-control serve --tls-cert tls.crt --tls-key tls.key\n  \
      remora-control serve --plaintext --objects ./objects/"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve discovery snapshots to the proxies over gRPC (remora.discovery.v1).
    #[command(
        long_about = "Serve discovery snapshots to the proxies over gRPC (remora.discovery.v1).\n\n\
        A proxy calls Watch with a target (the IP:port its pod connected to) and gets a whole \
        snapshot for it at once and after every change: passthrough when the target is not a \
        Service's ClusterIP and port, else the Service port, its ready endpoints and the routes \
        that apply to the proxy's namespace.\n\n\
        The objects (Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants, and Pods, whose \
        remora.io/status marks them meshed and as whom) come from the Kubernetes \
        API (in-cluster configuration or kubeconfig), or with --objects from files re-read within \
        a second of a change.\n\n\
        The same port serves remora.identity.v1: a proxy sends a CSR and its projected \
        ServiceAccount token (audience remora.io/identity) and gets a certificate whose only SAN \
        is spiffe://<trust domain>/ns/<namespace>/sa/<service account>, that of the token's \
        ServiceAccount. Tokens are checked with --identity-tokens, else by a TokenReview of the \
        Kubernetes API, also with --objects when there is one to reach (which also checks the pod \
        is a remora pod); with neither, no \
        certificates are issued. The CA comes from --ca-cert/--ca-key, else (reading the \
        cluster) from the Secret remora-system/remora-identity-ca, created when absent.\n\n\
        The admin listener answers GET /live, /ready (once the objects have been read and the \
        gRPC listener is bound) and /metrics (Prometheus text). The TLS certificate and key are \
        re-read when their files change, without a restart."
    )]
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port of the gRPC listener.
    #[arg(
        long,
        env = "REMORA_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:8090"
    )]
    listen: SocketAddr,

    /// Address and port of the admin listener (/live, /ready, /metrics; plain HTTP).
    #[arg(
        long,
        env = "REMORA_ADMIN_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:9990"
    )]
    admin_listen: SocketAddr,

    /// PEM certificate chain for the gRPC listener, server certificate first. Re-read when it
    /// changes. Requires --tls-key; either both or --plaintext. Without either, the identity CA
    /// issues the listener a certificate for remora-control.<POD_NAMESPACE>.svc (renewed
    /// before it expires), so the CA's certificate verifies the control plane too.
    #[arg(long, env = "REMORA_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert. Re-read when it changes.
    #[arg(long, env = "REMORA_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// Serve gRPC without TLS (tests, demos, a laptop). Excludes --tls-cert and --tls-key.
    #[arg(long)]
    plaintext: bool,

    /// Read the objects from this file or directory (recursively: *.yaml, *.yml, *.json)
    /// instead of the Kubernetes API, and re-read them when they change. Repeatable.
    #[arg(long, value_name = "PATH")]
    objects: Vec<PathBuf>,

    /// PEM certificate of the CA that signs workload certificates. Requires --ca-key. Re-read
    /// when it changes (cert-manager renewals). Without it, a control plane reading the cluster
    /// keeps its CA in the Secret remora-system/remora-identity-ca (created when absent); one
    /// reading --objects has none and issues no certificates.
    #[arg(long, env = "REMORA_CA_CERT", value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,

    /// PEM private key of --ca-cert (PKCS#8, PKCS#1 or SEC1). Re-read when it changes.
    #[arg(long, env = "REMORA_CA_KEY", value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,

    /// Check the proxies' identity tokens against this file instead of a TokenReview: kube-apiserver's
    /// static token file format, CSV lines `token,user,uid[,"group1,group2"]` whose user is
    /// `system:serviceaccount:NAMESPACE:NAME`. Re-read when it changes. For runs without a
    /// cluster (demos, tests).
    #[arg(long, env = "REMORA_IDENTITY_TOKENS", value_name = "FILE")]
    identity_tokens: Option<PathBuf>,

    /// How long a workload certificate is valid (proxies renew at 70 %): a duration such as
    /// `24h`, `90m` or `60s`, at least 10s; never past the CA's own expiry.
    #[arg(
        long,
        env = "REMORA_IDENTITY_LIFETIME",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = parse_lifetime
    )]
    identity_lifetime: Duration,

    /// The SPIFFE trust domain of identities: spiffe://<trust domain>/ns/<ns>/sa/<sa>. Lowercase
    /// letters, digits, `.`, `-` and `_`; the injector's --trust-domain must say the same.
    #[arg(
        long,
        env = "REMORA_TRUST_DOMAIN",
        value_name = "DOMAIN",
        default_value = identity::DEFAULT_TRUST_DOMAIN,
        value_parser = parse_trust_domain
    )]
    trust_domain: String,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `remora_control=debug,info`.
    #[arg(long, env = "REMORA_LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// Log line format, written to standard error.
    #[arg(long, env = "REMORA_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = remora_control::gateway::parse_duration(text.trim())
        .map_err(|_| format!("{text:?} is not a duration (expected e.g. 24h, 90m or 60s)"))?;
    if lifetime < Duration::from_secs(10) {
        return Err(format!("{text:?} is under the 10s minimum"));
    }
    Ok(lifetime)
}

fn parse_trust_domain(text: &str) -> Result<String, String> {
    if identity::valid_trust_domain(text) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a trust domain (lowercase letters, digits, '.', '-' and '_', e.g. cluster.local)"
        ))
    }
}

impl ServeArgs {
    /// The TLS files, or `None` for --plaintext; a usage error when the flags don't say which.
    fn transport(&self) -> Result<Transport, clap::Error> {
        let usage = |message: &str| {
            let mut command = Cli::command();
            // Built, the subcommand knows its full name for the usage line.
            command.build();
            match command.find_subcommand_mut("serve") {
                Some(serve) => serve.error(clap::error::ErrorKind::ArgumentConflict, message),
                None => command.error(clap::error::ErrorKind::ArgumentConflict, message),
            }
        };
        match (&self.tls_cert, &self.tls_key, self.plaintext) {
            (Some(cert), Some(key), false) => Ok(Transport::Files(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })),
            (None, None, true) => Ok(Transport::Plaintext),
            // A CA to issue from: the given one, or the one kept in the cluster.
            (None, None, false) if self.ca_cert.is_some() || self.objects.is_empty() => {
                Ok(Transport::FromCa)
            }
            (None, None, false) => Err(usage(
                "choose the gRPC transport: --tls-cert FILE --tls-key FILE, --plaintext, or a CA (--ca-cert/--ca-key) to issue a serving certificate from",
            )),
            (Some(_), None, false) => Err(usage("--tls-cert needs --tls-key (or use --plaintext)")),
            (None, Some(_), false) => Err(usage("--tls-key needs --tls-cert (or use --plaintext)")),
            (_, _, true) => Err(usage(
                "--plaintext excludes --tls-cert and --tls-key: give either both files or --plaintext",
            )),
        }
    }
}

/// How the gRPC listener serves.
enum Transport {
    Files(TlsFiles),
    Plaintext,
    /// TLS with a certificate the identity CA issues, for remora-control.<POD_NAMESPACE>.svc.
    FromCa,
}

/// The Service a self-issued serving certificate names, in POD_NAMESPACE (else this one).
const SERVING_SERVICE: &str = "remora-control";
const SERVING_NAMESPACE: &str = "remora-system";

/// How often --ca-cert and --ca-key are looked at for a change.
const CA_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: exiting"),
            _ = interrupt.recv() => tracing::info!("SIGINT: exiting"),
        }
    })
}

async fn serve(args: ServeArgs, transport: Transport) -> anyhow::Result<()> {
    let shutdown = shutdown_signal().await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());

    // The admin listener first: /live answers while the cluster is still being listed.
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", args.admin_listen))?;
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&health),
        Arc::clone(&metrics),
        async move {
            let _ = admin_stopped.await;
        },
    ));

    let from_ca = matches!(transport, Transport::FromCa);
    let mut acceptor = match transport {
        Transport::Plaintext | Transport::FromCa => None,
        Transport::Files(files) => {
            let resolver = Arc::new(CertResolver::default());
            let mut reloader = CertReloader::new(files.clone(), Arc::clone(&resolver));
            if let tls::Reload::Failed(error) = reloader.poll() {
                return Err(error).context("loading the TLS certificate");
            }
            tracing::info!(cert = %files.cert.display(), key = %files.key.display(), "loaded the TLS certificate");
            tokio::spawn(reloader.run(tls::RELOAD_INTERVAL));
            // HTTP/2 alone: gRPC runs on nothing else, and a client that requires ALPN `h2`
            // (tonic's does) fails its handshake without it.
            Some(TlsAcceptor::from(Arc::new(tls::server_config(
                resolver,
                &[b"h2"],
            )?)))
        }
    };

    // Read before anything waits on the cluster: a bad file is a usage error at once.
    let ca_slot = CaSlot::default();
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let files = CaFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let ca = files.read()?;
        tracing::info!(cert = %cert.display(), not_after = ca.not_after(), "identity CA read");
        ca_slot.store(Some(Arc::new(ca)));
        tokio::spawn(files.watch(Arc::clone(&ca_slot), CA_RELOAD_INTERVAL));
    }
    let tokens = match &args.identity_tokens {
        None => None,
        Some(path) => {
            let tokens = StaticTokens::load(path)?;
            tracing::info!(file = %path.display(), tokens = tokens.len(), "identity tokens read");
            Some(tokens)
        }
    };

    let (source, client) = if args.objects.is_empty() {
        tracing::info!("reading objects from the Kubernetes API");
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
        let source = remora_control::kube_source::watch_cluster(client.clone()).await?;
        (source, Some(client))
    } else {
        tracing::info!(paths = ?args.objects, "reading objects from files");
        let source = watch::watch_objects(args.objects.clone(), watch::POLL_INTERVAL);
        // TokenReviews still go to a cluster's API server when there is one to reach.
        let client = match &tokens {
            Some(_) => None,
            None => kube::Client::try_default()
                .await
                .map_err(|error| tracing::debug!(%error, "no Kubernetes API for TokenReviews"))
                .ok(),
        };
        (source, client)
    };
    let hub = Hub::start(source, Arc::clone(&metrics)).await;

    let reviewer = match (tokens, &client) {
        (Some(tokens), _) => Some(Reviewer::Tokens(tokens)),
        (None, Some(client)) => Some(Reviewer::Api(
            identity::review::cluster::TokenReviewer::new(client.clone()),
        )),
        (None, None) => {
            tracing::warn!(
                "no --identity-tokens and no Kubernetes API to review tokens with: no workload certificates will be issued, proxies stay plaintext"
            );
            None
        }
    };
    if ca_slot.load().is_none() {
        match (&client, args.objects.is_empty()) {
            (Some(client), true) => {
                let secret = identity::secret::SecretName::default();
                // Not fatal: discovery works without it, and the loop below tries again.
                match identity::secret::ensure(client, &secret, &args.trust_domain).await {
                    Ok(ca) => {
                        tracing::info!(%secret, not_after = ca.not_after(), "identity CA");
                        ca_slot.store(Some(Arc::new(ca)));
                    }
                    Err(error) => tracing::error!(
                        %error,
                        "no identity CA yet: no workload certificates until the Secret can be read or written"
                    ),
                }
                tokio::spawn(identity::secret::watch(
                    client.clone(),
                    secret,
                    args.trust_domain.clone(),
                    Arc::clone(&ca_slot),
                    identity::secret::RESYNC_INTERVAL,
                ));
            }
            _ => tracing::warn!(
                "no identity CA (--ca-cert/--ca-key): no workload certificates will be issued, proxies stay plaintext"
            ),
        }
    }
    if from_ca {
        let namespace =
            std::env::var("POD_NAMESPACE").unwrap_or_else(|_| SERVING_NAMESPACE.to_string());
        let names = identity::serving::dns_names(SERVING_SERVICE, &namespace);
        let issued = identity::serving::SelfIssued::start(Arc::clone(&ca_slot), names.clone())?;
        acceptor = Some(TlsAcceptor::from(Arc::new(issued.server_config()?)));
        tracing::info!(?names, "serving with a certificate the identity CA issued");
    }
    let identity = IdentityService::new(
        Arc::clone(&ca_slot),
        reviewer,
        args.trust_domain.clone(),
        args.identity_lifetime,
        Arc::clone(&hub),
        Arc::clone(&metrics),
    );

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        admin = %args.admin_listen,
        tls = acceptor.is_some(),
        "serving"
    );
    health.ready.store(true, Ordering::SeqCst);
    server::serve_routes(
        listener,
        server::routes(hub).add_service(identity.into_server()),
        acceptor,
        shutdown,
    )
    .await;
    health.ready.store(false, Ordering::SeqCst);
    let _ = stop_admin.send(());
    // The admin server only holds idle scrapes: it stops at once.
    if let Ok(Err(error)) = admin.await {
        tracing::warn!(%error, "admin listener");
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let transport = args.transport().unwrap_or_else(|error| error.exit());
            logging::init(
                &args.log_level,
                args.log_format,
                "remora_control=debug,info",
            )?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(args, transport))?;
            // Streams never end on their own: don't wait for their connections' tasks.
            runtime.shutdown_background();
        }
    }
    Ok(())
}

/// The error with its causes, each once.
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
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("remora-control: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}
