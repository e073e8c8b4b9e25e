//! The `unitgate` command line: parses arguments and hands over to the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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

/// `--config FILE` (or `UNITGATE_CONFIG`), shared by every subcommand that reads the config.
#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(
        long,
        short,
        default_value = "/etc/unitgate/config.toml",
        env = "UNITGATE_CONFIG"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        #[command(flatten)]
        config: ConfigArg,
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
        #[command(flatten)]
        config: ConfigArg,
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
    /// Ask the running daemon (over its control socket) for links, backlog and devices.
    /// Exit 0 running, 3 not running, 4 cannot tell.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The control socket (instead of the one the config names).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the daemon's answers as JSON: {"status": ..., "devices": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Copy the replica to FILE, consistently, while the daemon runs (SQLite online backup).
    Backup {
        /// The backup file to write.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Replace the replica with a checked backup; the daemon must be stopped. The current
    /// replica is kept as <db>.before-restore-<timestamp>.
    Restore {
        /// The backup file to restore.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        /// Restore a backup of another site.
        #[arg(long)]
        force: bool,
    },
    /// Apply pending schema migrations to the replica (the daemon must be stopped).
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the version.
    Version,
}

/// The config an ops command reads: only its paths and site id matter, so a config that
/// fails validation for another reason still serves.
fn ops_config(path: &std::path::Path) -> Result<Config> {
    let cfg =
        Config::load_unchecked(Some(path)).with_context(|| format!("config {}", path.display()))?;
    if cfg.store.data_dir.as_os_str().is_empty() {
        anyhow::bail!("config {}: store.data_dir is not set", path.display());
    }
    Ok(cfg)
}

fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("ug_{}", hex::encode(bytes))
}

/// Serves until SIGTERM/SIGINT (SIGHUP kicks the automation scheduler), then stops.
async fn run_until_signal(gw: Gateway) -> Result<()> {
    Ok(unitgate::service::run(gw, None, false).await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    // Test builds only (cargo feature `failpoints`): FAILPOINTS arms them for the process.
    #[cfg(feature = "failpoints")]
    unitgate::failpoint::arm_from_env().map_err(anyhow::Error::msg)?;
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run {
            config: ConfigArg { config },
        } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("config {}", config.display()))?;
            unitgate::logging::init(&cfg.log.level, &cfg.log.format);
            let gw = Gateway::start(&cfg, system_clock()).await?;
            let reloader = unitgate::reload::Reloader::new(config, cfg.clone());
            Ok(unitgate::service::run(gw, Some(reloader), !cfg.api.plain_http).await?)
        }
        Cmd::Demo {
            listen,
            token,
            data_dir,
            sim_listen,
            mqtt_listen,
        } => {
            let mut cfg = Config::from_toml(unitgate::demo::DEMO_CONFIG)?;
            unitgate::logging::init(&cfg.log.level, &cfg.log.format);
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
            // Its own control socket, so a demo never collides with an installed daemon.
            let sock = cfg.store.data_dir.join("control.sock");
            cfg.api.control_socket = if sock.as_os_str().len() <= 107 {
                sock
            } else {
                PathBuf::new()
            };
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
            println!("  page:     {url}/status   (enter the token below)");
            println!("  data dir: {}", cfg.store.data_dir.display());
            if !cfg.api.control_socket.as_os_str().is_empty() {
                println!(
                    "  status:   unitgate status --socket {}",
                    cfg.api.control_socket.display()
                );
            }
            println!("  token:    {token}");
            #[cfg(feature = "demo-sim")]
            println!(
                "  hardware: {} (a page of the simulated site; hw-sim ctl show --url {})",
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
        Cmd::CheckConfig {
            config: ConfigArg { config },
        } => {
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
            for w in cfg.warnings() {
                eprintln!("{}: warning: {w}", config.display());
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
        Cmd::Status {
            config: ConfigArg { config },
            socket,
            json,
        } => {
            use unitgate::ops::{EXIT_OK, EXIT_UNKNOWN, status};
            let socket = match socket {
                Some(s) => s,
                None => match Config::load_unchecked(Some(&config)) {
                    Ok(c) if !c.api.control_socket.as_os_str().is_empty() => c.api.control_socket,
                    Ok(_) => {
                        eprintln!(
                            "{}: api.control_socket is \"\" (no control socket); pass --socket PATH",
                            config.display()
                        );
                        std::process::exit(EXIT_UNKNOWN);
                    }
                    Err(e) => {
                        eprintln!("{}: {e}; or pass --socket PATH", config.display());
                        std::process::exit(EXIT_UNKNOWN);
                    }
                },
            };
            match status::fetch(&socket).await {
                Ok(report) if json => {
                    println!("{}", serde_json::to_string_pretty(&report.to_json())?)
                }
                Ok(report) => print!("{}", status::render(&report, chrono::Utc::now())),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(e.exit_code());
                }
            }
            std::process::exit(EXIT_OK);
        }
        Cmd::Backup {
            file,
            config: ConfigArg { config },
            force,
        } => {
            let cfg = ops_config(&config)?;
            let db = cfg.store.db_path();
            let info = tokio::task::spawn_blocking(move || {
                unitgate::ops::backup::backup(&db, &file, force).map(|i| (file, i))
            })
            .await?;
            let (file, info) = info?;
            println!(
                "backup {}: {} bytes, schema version {}, site {}, last event seq {}, integrity ok",
                file.display(),
                info.bytes,
                info.schema_version,
                info.site_id.as_deref().unwrap_or("-"),
                info.last_seq
            );
            Ok(())
        }
        Cmd::Restore {
            file,
            config: ConfigArg { config },
            force,
        } => {
            let cfg = ops_config(&config)?;
            let answers = unitgate::ops::daemon_answers(&cfg.api.control_socket).await;
            let restored = tokio::task::spawn_blocking(move || {
                unitgate::ops::backup::restore(
                    &file,
                    &cfg.store.db_path(),
                    &cfg.store.data_dir,
                    &cfg.site.id,
                    force,
                    answers,
                    chrono::Utc::now(),
                )
                .map(|r| (r, cfg.store.db_path()))
            })
            .await?;
            let (r, db) = restored?;
            if let Some(kept) = &r.kept {
                println!("kept the previous replica as {}", kept.display());
            }
            println!(
                "restored {}: schema version {}, site {}, last event seq {}; start the daemon",
                db.display(),
                r.info.schema_version,
                r.info.site_id.as_deref().unwrap_or("-"),
                r.info.last_seq
            );
            Ok(())
        }
        Cmd::Migrate {
            config: ConfigArg { config },
        } => {
            let cfg = ops_config(&config)?;
            let db = cfg.store.db_path();
            let shown = db.display().to_string();
            let m = tokio::task::spawn_blocking(move || {
                unitgate::ops::migrate::migrate(&db, &cfg.store.data_dir)
            })
            .await??;
            if m.from == m.to {
                println!("{shown}: schema version {} (up to date)", m.to);
            } else {
                println!("{shown}: schema version {} -> {}", m.from, m.to);
            }
            Ok(())
        }
        Cmd::Version => {
            println!("unitgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
