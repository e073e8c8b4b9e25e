//! `hw-sim`: serve a simulated site, or drive one (`ctl`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use std::path::PathBuf;
use std::process::ExitCode;

mod ctl;

/// A simulated self-storage site: OSDP keypads, Modbus relay boards, a smart-lock API.
#[derive(Parser)]
#[command(name = "hw-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every device of a site file and the control API.
    Serve {
        /// Site file.
        #[arg(long, short, default_value = "config/sim.toml")]
        config: PathBuf,
        /// Control API address (default: the file's sim.control_listen).
        #[arg(long)]
        listen: Option<String>,
        /// Put every device on a free port and its serial link in a temporary directory.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Run scenario files against a simulator; exit 0 if every step passes, 1 if not.
    Run {
        /// Scenario files (TOML).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Control API of a running simulator.
        #[arg(long, env = "HW_SIM_URL", default_value = "http://127.0.0.1:9900")]
        url: String,
        /// Start this site in-process instead of using a running simulator.
        #[arg(long)]
        site: Option<PathBuf>,
        /// With --site: free ports and a temporary directory for serial links.
        #[arg(long, requires = "site")]
        ephemeral: bool,
    },
    /// Drive a running simulator through its control API.
    Ctl(ctl::CtlArgs),
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    // ctl's output is its results: keep library logs to warnings unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Cmd::Ctl(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Ctl(args) => Ok(ctl::run(args).await),
        Cmd::Serve {
            config,
            listen,
            ephemeral,
        } => {
            let (site, dir) = load_site(&config, ephemeral)?;
            let sim = Sim::start(&site, listen.as_deref())
                .await
                .context("starting the site")?;
            print_site(&sim);
            shutdown_signal().await;
            sim.stop().await;
            remove_dir(dir);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            scenarios,
            url,
            site,
            ephemeral,
        } => {
            let mut loaded = Vec::new();
            for path in &scenarios {
                match hw_sim::scenario::Scenario::load(path) {
                    Ok(s) => loaded.push(s),
                    Err(e) => {
                        eprintln!("hw-sim run: {e}");
                        return Ok(ExitCode::from(2));
                    }
                }
            }
            let (sim, dir) = match &site {
                Some(path) => {
                    let (site, dir) = load_site(path, ephemeral)?;
                    let sim = Sim::start(&site, ephemeral.then_some("127.0.0.1:0"))
                        .await
                        .context("starting the site")?;
                    (Some(sim), dir)
                }
                None => (None, None),
            };
            let base = sim.as_ref().map_or(url, |s| s.control_url());
            let mut all_passed = true;
            for scenario in &loaded {
                let report = hw_sim::scenario::run(scenario, &base).await;
                print!("{}", report.render());
                all_passed &= report.passed();
            }
            if let Some(sim) = sim {
                sim.stop().await;
            }
            remove_dir(dir);
            Ok(if all_passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Loads a site file; with `ephemeral`, moves it to free ports and a fresh directory.
fn load_site(path: &std::path::Path, ephemeral: bool) -> Result<(SiteFile, Option<PathBuf>)> {
    let site = SiteFile::load(path)?;
    if !ephemeral {
        return Ok((site, None));
    }
    let dir = std::env::temp_dir().join(format!("hw-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((site.ephemeral(&dir), Some(dir)))
}

fn remove_dir(dir: Option<PathBuf>) {
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Prints where every device is, as a technician needs it to wire a gateway up.
fn print_site(sim: &Sim) {
    let r = &sim.registry;
    println!("hw-sim: control API {}", sim.control_url());
    for k in r.keypads.values() {
        let a = k.address();
        let mut at = Vec::new();
        if let Some(serial) = a["serial"].as_str().filter(|s| !s.is_empty()) {
            at.push(format!(
                "serial {serial} -> {}",
                a["pty"].as_str().unwrap_or("?")
            ));
        }
        if let Some(tcp) = a["tcp"].as_str().filter(|s| !s.is_empty()) {
            at.push(format!("tcp {tcp}"));
        }
        println!(
            "hw-sim: keypad {} (OSDP address {}): {}",
            k.id(),
            a["osdp_address"],
            at.join(", ")
        );
    }
    for b in r.relays.values() {
        let a = b.address();
        let at = match a["transport"].as_str() {
            Some("rtu") => format!(
                "modbus rtu {} -> {}",
                a["serial"].as_str().unwrap_or("?"),
                a["pty"].as_str().unwrap_or("?")
            ),
            _ => format!("modbus tcp {}", a["address"].as_str().unwrap_or("?")),
        };
        println!(
            "hw-sim: relay board {} (unit {}): {at}",
            b.id(),
            a["unit_id"]
        );
    }
    if let Some(l) = &r.locks {
        let a = l.address();
        let key = match (a["api_key"].as_str(), a["api_key_file"].as_str()) {
            (Some(k), _) => format!("API key {k}"),
            (None, Some(f)) => format!("API key from {f}"),
            (None, None) => String::new(),
        };
        println!(
            "hw-sim: lock API {} at {} ({key})",
            l.id(),
            a["url"].as_str().unwrap_or("?")
        );
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
