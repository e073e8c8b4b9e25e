//! The `unitgate` command line: parses arguments and hands over to the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use unitgate::api::http::auth::token_hash_hex;
use unitgate::command::system_clock;
use unitgate::config::{Config, TokenConfig};
use unitgate::gateway::Gateway;

/// Per-site edge gateway for self-storage facilities.
#[derive(Parser)]
#[command(name = "unitgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// Configuration file.
        #[arg(
            long,
            short,
            default_value = "/etc/unitgate/config.toml",
            env = "UNITGATE_CONFIG"
        )]
        config: PathBuf,
    },
    /// Run a demo site on localhost (plain HTTP) with a fresh admin token.
    Demo {
        /// API listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Use this admin token instead of a generated one.
        #[arg(long)]
        token: Option<String>,
        /// Keep the replica here (default: a temporary directory removed on exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Control API of the simulated hardware (hw-sim).
        #[arg(long, default_value = "127.0.0.1:9900")]
        sim_listen: String,
        /// The embedded MQTT broker (MQTT 3.1.1) the gateway's MQTT link talks to.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt_listen: String,
    },
    /// Check a configuration file; prints every problem with its key and exits 1 if any.
    CheckConfig {
        /// Configuration file.
        #[arg(
            long,
            short,
            default_value = "/etc/unitgate/config.toml",
            env = "UNITGATE_CONFIG"
        )]
        config: PathBuf,
    },
    /// Generate an API token and the [[api.tokens]] entry (with its hash) for the config.
    Token {
        /// Name of the token holder.
        #[arg(long, default_value = "cloud")]
        name: String,
        /// Scopes (read, allocations:write, units:write, admin).
        #[arg(long, value_delimiter = ',', default_value = "admin")]
        scopes: Vec<String>,
    },
    /// Print the version.
    Version,
}

fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        "json" => true,
        "human" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("ug_{}", hex::encode(bytes))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// SIGHUP makes the automation scheduler look again now (e.g. after NTP set the clock).
fn kick_automations_on_sighup(automation: unitgate::automation::AutomationHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: checking automations now");
                    automation.kick();
                }
            });
        }
    }
    #[cfg(not(unix))]
    let _ = automation;
}

async fn run_until_signal(mut gw: Gateway) -> Result<()> {
    kick_automations_on_sighup(gw.automation.clone());
    tokio::select! {
        r = gw.wait() => r.context("the API server stopped")?,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    gw.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { config } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("config {}", config.display()))?;
            init_logging(&cfg.log.level, &cfg.log.format);
            let gw = Gateway::start(&cfg, system_clock()).await?;
            run_until_signal(gw).await
        }
        Cmd::Demo {
            listen,
            token,
            data_dir,
            sim_listen,
            mqtt_listen,
        } => {
            let mut cfg = Config::from_toml(unitgate::demo::DEMO_CONFIG)?;
            init_logging(&cfg.log.level, &cfg.log.format);
            let token = token.unwrap_or_else(new_token);
            let _temp;
            cfg.store.data_dir = match data_dir {
                Some(d) => d,
                None => {
                    let t = tempfile::Builder::new()
                        .prefix("unitgate-demo-")
                        .tempdir()?;
                    let p = t.path().to_owned();
                    _temp = t;
                    p
                }
            };
            cfg.api.listen = listen;
            cfg.api.tokens = vec![TokenConfig {
                name: "demo-admin".into(),
                sha256: token_hash_hex(&token),
                scopes: vec!["admin".into()],
            }];
            #[cfg(feature = "demo-sim")]
            let sim = unitgate::demo::start_hardware(&mut cfg, &sim_listen).await?;
            #[cfg(not(feature = "demo-sim"))]
            {
                let _ = sim_listen;
                cfg.devices = unitgate::demo::declared_devices()?;
            }
            #[cfg(feature = "demo-broker")]
            let mqtt = {
                let addr = tokio::task::spawn_blocking(move || {
                    unitgate::cloud::broker::start(&mqtt_listen)
                })
                .await??;
                cfg.cloud.mqtt = Some(serde_json::from_value(serde_json::json!({
                    "url": format!("mqtt://{addr}"),
                    "protocol": "v3.1.1",
                }))?);
                addr
            };
            #[cfg(not(feature = "demo-broker"))]
            let _ = mqtt_listen;
            if let Err(problems) = cfg.validate() {
                for p in problems {
                    eprintln!("{p}");
                }
                anyhow::bail!("the demo configuration is invalid");
            }
            let gw = Gateway::start(&cfg, system_clock()).await?;
            let seeded = unitgate::demo::seed(&gw.executor).await?;
            let url = format!("http://{}", gw.addr);
            println!(
                "unitgate demo: site {:?} ({})",
                cfg.site.id,
                if seeded { "seeded" } else { "existing replica" }
            );
            println!("  API:      {url}/v1   (OpenAPI: {url}/openapi.json)");
            println!("  data dir: {}", cfg.store.data_dir.display());
            println!("  token:    {token}");
            #[cfg(feature = "demo-sim")]
            println!(
                "  hardware: {} (hw-sim ctl show --url {})",
                sim.control_url(),
                sim.control_url()
            );
            println!();
            println!("  export UNITGATE_URL={url} TOKEN={token}");
            println!(
                "  curl -s -H \"Authorization: Bearer $TOKEN\" $UNITGATE_URL/v1/units?limit=5"
            );
            #[cfg(feature = "demo-broker")]
            {
                let site = &cfg.site.id;
                let (h, p) = (mqtt.ip(), mqtt.port());
                println!();
                println!("  MQTT broker: mqtt://{mqtt}   (events, unit states, replies:)");
                println!("  mosquitto_sub -h {h} -p {p} -t 'unitgate/v1/{site}/#' -v");
                println!(
                    "  mosquitto_pub -h {h} -p {p} -t 'unitgate/v1/{site}/cmd/get_unit' -m '{{\"request_id\":\"r1\",\"unit_id\":\"u-A01\"}}'"
                );
            }
            println!();
            println!("Ctrl-C to stop.");
            let result = run_until_signal(gw).await;
            #[cfg(feature = "demo-sim")]
            sim.stop().await;
            result
        }
        Cmd::CheckConfig { config } => {
            let cfg = match Config::load_unchecked(Some(&config)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    std::process::exit(1);
                }
            };
            let mut problems: Vec<String> = match cfg.validate() {
                Ok(()) => Vec::new(),
                Err(problems) => problems.iter().map(ToString::to_string).collect(),
            };
            // The TLS files are read here too, so a bad certificate shows before a restart.
            if problems.is_empty()
                && !cfg.api.plain_http
                && let Err(e) = unitgate::api::http::tls::server_config(&cfg.api)
            {
                problems.push(e.to_string());
            }
            if problems.is_empty() {
                println!("{}: ok", config.display());
                return Ok(());
            }
            for p in &problems {
                eprintln!("{}: {p}", config.display());
            }
            std::process::exit(1);
        }
        Cmd::Token { name, scopes } => {
            let token = new_token();
            println!("token (give this to the client; it is not stored anywhere):\n  {token}\n");
            println!(
                "config entry:\n[[api.tokens]]\nname = {name:?}\nsha256 = \"{}\"\nscopes = {scopes:?}",
                token_hash_hex(&token)
            );
            Ok(())
        }
        Cmd::Version => {
            println!("unitgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
