//! The `keygate` binary: CLI, load config, build the Pingora server, run.

use anyhow::Context;
use clap::{Parser, Subcommand};
use keygate::config::Config;
use keygate::{Gate, KeyTable};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "An edge gateway for LLM API keys and quotas"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The YAML config file.
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
    },
    /// Validate the config and the sync file; exit non-zero with the problem.
    Check {
        /// The YAML config file.
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
    },
    /// The gateway plus a built-in mock backend and demo keys; prints curl lines to try.
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the demo's metrics listen.
        #[arg(long, default_value = "127.0.0.1:9091")]
        metrics_listen: String,
    },
    /// Run only the built-in OpenAI-compatible mock backend.
    Mock {
        /// Where the mock listens.
        #[arg(long, default_value = "127.0.0.1:18000")]
        listen: String,
    },
}

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("keygate=info,warn"),
    )
    .init();
    if let Err(e) = real_main() {
        eprintln!("keygate: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Demo {
            listen,
            metrics_listen,
        } => demo(&listen, &metrics_listen),
        Command::Mock { listen } => {
            let addr = keygate::demo::start_mock_thread(&listen)?;
            println!("keygate: mock backend on http://{addr}");
            loop {
                std::thread::park();
            }
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<(Config, Gate)> {
    let config = Config::load(path)?;
    let gate = Gate::from_config(&config).map_err(anyhow::Error::msg)?;
    Ok((config, gate))
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, gate) = load(path)?;
    let table = gate.table();
    log::info!(
        "loaded {} keys (revision {}) from {}",
        table.len(),
        table.revision,
        config.sync_file.display()
    );
    keygate::reload::Reloader::new(gate.clone(), &config.sync_file)
        .spawn(config.watch_sync_file)?;
    let (server, _bound) = keygate::server::build(&config, gate.clone())?;
    keygate::server::run(server, &gate);
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let table = KeyTable::load(&config.sync_file)?;
    keygate::Upstreams::from_config(&config.upstreams)
        .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    println!(
        "ok: {} ({} upstreams), {} ({} keys, revision {})",
        path.display(),
        config.upstreams.len(),
        config.sync_file.display(),
        table.len(),
        table.revision
    );
    Ok(())
}

fn demo(listen: &str, metrics_listen: &str) -> anyhow::Result<()> {
    let mock = keygate::demo::start_mock_thread("127.0.0.1:0")?;
    let dir = std::env::temp_dir().join(format!("keygate-demo-{}", std::process::id()));
    let listen = keygate::server::resolve_port_zero(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let metrics_listen = keygate::server::resolve_port_zero(metrics_listen)
        .with_context(|| format!("cannot listen on {metrics_listen}"))?;
    let (config_path, keys) =
        keygate::demo::write_demo_files(&dir, &listen, &metrics_listen, mock)?;
    let (config, gate) = load(&config_path)?;
    println!(
        "keygate demo: mock backend on http://{mock}, files in {}",
        dir.display()
    );
    println!("keygate demo: try these (the keys are new on every run):\n");
    println!(
        "{}",
        keygate::demo::curl_lines(&format!("http://{listen}"), &keys)
    );
    let (server, _bound) = keygate::server::build(&config, gate.clone())?;
    keygate::server::run(server, &gate);
    Ok(())
}
