//! The `kvstore` binary: parse etcd-style flags, start the member, serve clients.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use kvstore::config::{Config, LogFormat, LogLevel, MemberUrl};
use kvstore::server::EtcdServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

/// mimalloc: less CPU per allocation than glibc's malloc under many threads, and
/// freed memory goes back to the system sooner. Built without transparent huge
/// pages (feature `no_thp`): with them, 2 MiB pages are touched where 4 KiB would do,
/// and peak RSS was about 11 % higher for the same 100,000 puts, at no gain in speed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error | LogLevel::Panic | LogLevel::Fatal => "error",
    };
    // openraft logs every election at info; keep it at warn unless debugging.
    let filter = if level == "debug" {
        "debug".to_string()
    } else {
        format!("{level},openraft=warn")
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

async fn bind(url: &MemberUrl) -> anyhow::Result<TcpListener> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve listen URL {url}: {e}"))?
        .collect();
    // Prefer IPv4, as etcd's "localhost" binds 127.0.0.1.
    let address = addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addresses.first())
        .ok_or_else(|| anyhow::anyhow!("listen URL {url} resolves to no address"))?;
    TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("failed to listen on {url} ({address}): {e}"))
}

async fn run(config: Config) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid flags: {e}"))?;
    // Bind first: a port in use should fail before the data dir is touched.
    let mut listeners = Vec::new();
    for url in &config.listen_client_urls.0 {
        listeners.push((url.clone(), bind(url).await?));
    }
    let mut peer_listeners = Vec::new();
    for url in &config.listen_peer_urls.0 {
        peer_listeners.push((url.clone(), bind(url).await?));
    }
    let mut metrics_listeners = Vec::new();
    for url in config.listen_metrics_urls.iter().flat_map(|list| &list.0) {
        metrics_listeners.push((url.clone(), bind(url).await?));
    }
    let tls_options = config.tls_options();
    let server_tls = |files: Option<kvstore::tls::TlsFiles>| -> anyhow::Result<_> {
        files
            .map(|files| kvstore::tls::ServerTls::new(files, tls_options.clone()))
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))
    };
    let client_tls = server_tls(config.client_tls_files().map_err(|e| anyhow::anyhow!(e))?)?;
    let peer_tls = server_tls(config.peer_tls_files().map_err(|e| anyhow::anyhow!(e))?)?;
    let limits = kvstore::listener::ListenerLimits {
        max_connections: config.max_connections as usize,
        handshake_timeout: config.tls_handshake_timeout,
        check_client_san: false,
    };
    // As etcd: a peer's certificate must name the address it connects from.
    let check_peer_san = !config.experimental_peer_skip_client_san_verification;
    let keepalive =
        (!config.grpc_keepalive_interval.is_zero()).then_some(config.grpc_keepalive_interval);
    let keepalive_timeout = config.grpc_keepalive_timeout;
    let max_streams = config.max_concurrent_streams;

    let server = EtcdServer::start(&config).await?;
    let identity = server.identity();
    tracing::info!(
        name = %config.name,
        member_id = %format!("{:x}", identity.member_id),
        cluster_id = %format!("{:x}", identity.cluster_id),
        data_dir = %config.data_dir().display(),
        "kvstore member started"
    );

    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    let mut serving = tokio::task::JoinSet::new();
    let serve = |serving: &mut tokio::task::JoinSet<Result<(), tonic::transport::Error>>,
                 url: &MemberUrl,
                 listener: TcpListener,
                 tls: &Option<std::sync::Arc<kvstore::tls::ServerTls>>,
                 check_client_san: bool,
                 routes: tonic::service::Routes| {
        let mut shutdown = shutdown.clone();
        let limits = kvstore::listener::ListenerLimits {
            check_client_san,
            ..limits
        };
        // As etcd: an http URL is served in plain text even when TLS is configured.
        let tls = if url.scheme == "https" {
            tls.clone()
        } else {
            None
        };
        serving.spawn(async move {
            let incoming = kvstore::listener::incoming(listener, tls, limits)
                .map(|connection| connection.map(kvstore::api::authority::AuthorityFix::new));
            tonic::transport::Server::builder()
                .accept_http1(true)
                .max_concurrent_streams(max_streams)
                .http2_keepalive_interval(keepalive)
                .http2_keepalive_timeout(Some(keepalive_timeout))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                })
                .await
        });
    };
    for (url, listener) in peer_listeners {
        tracing::info!(%url, "serving peer requests");
        serve(
            &mut serving,
            &url,
            listener,
            &peer_tls,
            check_peer_san,
            kvstore::api::peer::peer_routes(server.clone()),
        );
    }
    for (url, listener) in metrics_listeners {
        tracing::info!(%url, "serving metrics");
        let router = kvstore::api::http::metrics_router(server.clone());
        serve(
            &mut serving,
            &url,
            listener,
            &client_tls,
            false,
            tonic::service::Routes::from(router),
        );
    }

    // As etcd: clients are served once this member has published its name and
    // client URLs through the log (which needs a leader); until then connections
    // wait in the listen queue.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = server.wait_published() => {}
        _ = tokio::signal::ctrl_c() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
        fatal = server.raft_failed() => return Err(raft_failed(fatal)),
        _ = server.removals().own_removal() => {
            log_removed();
            server.shutdown().await;
            return Ok(());
        }
    }
    for (url, listener) in listeners {
        tracing::info!(%url, "serving client requests");
        serve(
            &mut serving,
            &url,
            listener,
            &client_tls,
            false,
            kvstore::api::routes(server.clone()),
        );
    }

    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received interrupt, shutting down"),
        _ = terminate.recv() => tracing::info!("received SIGTERM, shutting down"),
        Some(result) = serving.join_next() => {
            result??;
        }
        fatal = server.raft_failed() => return Err(raft_failed(fatal)),
        _ = server.removals().own_removal() => log_removed(),
    }
    let _ = shutdown_sender.send(true);
    while serving.join_next().await.is_some() {}
    server.shutdown().await;
    Ok(())
}

/// What a removed member says before it stops, as etcd does (and, like etcd, it then
/// exits with status 0: the removal is not a failure).
fn log_removed() {
    tracing::error!("{}", kvstore::raft::REMOVED_MESSAGE);
    tracing::info!("the data-dir used by this member must be removed");
}

/// The error that ends the process when Raft stopped on `fatal`.
fn raft_failed(fatal: String) -> anyhow::Error {
    tracing::error!(error = %fatal, "raft stopped on an error; exiting");
    anyhow::anyhow!("raft stopped on an error: {fatal}")
}

/// Raises the soft limit of open files to the hard limit, as Go programs (etcd
/// among them) do at start: every client connection and RocksDB file takes one.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        return snapshot_command(&args[2..]);
    }
    let config = Config::parse();
    init_logging(config.log_level, config.log_format);
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvstore: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvstore: {e:#}");
            1
        }
    };
    // RocksDB's static objects must not be destroyed under threads that may still
    // touch the database (tasks of the raft runtime hold it until the very end); a
    // normal exit runs those destructors and can abort ("terminate called without an
    // active exception"). Every write was synced before it was acknowledged and
    // background work is stopped, so the process ends here without them, as RocksDB's
    // own tools do once a database is open.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// `kvstore snapshot restore FILE [flags]`, as `etcdutl snapshot restore`.
fn snapshot_command(args: &[String]) -> ExitCode {
    init_logging(LogLevel::Info, LogFormat::Text);
    if args.first().map(String::as_str) != Some("restore") {
        eprintln!("kvstore: usage: kvstore snapshot restore FILE --name NAME --data-dir DIR --initial-cluster ... --initial-cluster-token ... --initial-advertise-peer-urls ...");
        return ExitCode::from(2);
    }
    let restore_args = match kvstore::restore::RestoreArgs::try_parse_from(
        std::iter::once("kvstore snapshot restore".to_string()).chain(args[1..].iter().cloned()),
    ) {
        Ok(parsed) => parsed,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(2);
        }
    };
    match kvstore::restore::restore(&restore_args) {
        Ok(dir) => {
            println!("restored snapshot to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kvstore: {error:#}");
            ExitCode::FAILURE
        }
    }
}
