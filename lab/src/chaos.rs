//! `ledger-lab chaos`: steady load through the API while processes die, then proof that nothing was lost.
//!
//! It runs the ledger as separate processes (the `ledger` binary's subcommands): two API instances, the relay, the
//! process manager, the projection workers, the sealer, the simulator and the paper executor, against a fresh
//! database and a broker it owns (nisshi with PostgreSQL storage, so that a restarted broker keeps its topics).
//! Clients drive deposits, withdrawals and market orders through both API instances with idempotency keys,
//! retrying each request (same key) until it is answered. Meanwhile, at random moments, it kills the relay, a
//! projection worker and an API instance with SIGKILL (a supervisor restarts whatever is down, as systemd or
//! Kubernetes would), restarts the broker, and restarts PostgreSQL once (when given the command to).
//!
//! Then it lets the system settle and checks:
//! 1. every command acknowledged to a client is in the log exactly once;
//! 2. the events topic holds every event of the log;
//! 3. every read model equals a fresh rebuild from the log;
//! 4. the portfolio invariants hold (the aggregate's own: reserved cash = Σ reservations, Σ lots = position, a
//!    deficit only with its marker, …);
//! 5. every order agrees with its portfolio (fills booked once, reservations released when done);
//! 6. the audit chain verifies against the log.
//!
//! Exit 0 when all hold; otherwise 1, with a report naming what failed and where the processes' logs are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ledger::commands::{CommandConfig, CommandService};
use ledger::domain::Portfolio;
use ledger::kafka::KafkaConfig;
use ledger_api::auth::{Role, TokenKeys};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::support::settle;

/// How long the system may take to settle after the load stops, at least (longer runs get as long as they ran:
/// workers killed every few seconds may end the run with that much backlog).
const SETTLE_TIMEOUT_SECS: u64 = 180;
/// How long a client keeps retrying one request.
const REQUEST_RETRY_SECS: u64 = 120;
/// Requests of the load waiting for their answers, at most (all clients together).
const LOAD_IN_FLIGHT_MAX: usize = 256;
/// One HTTP request's timeout (it is retried, same key, until answered).
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How long the broker stays down when it is restarted.
const BROKER_DOWN_MS: u64 = 2_000;
/// The supervisor looks for dead processes every 300 to 1,200 ms (seeded).
const SUPERVISE_EVERY_MS_MIN: u64 = 300;
const SUPERVISE_EVERY_MS_MAX: u64 = 1_200;
const SECRET: &str = "chaos-secret-of-at-least-thirty-two-bytes";

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Seconds of load and faults.
    #[arg(long, default_value_t = 60)]
    pub duration_secs: u64,
    /// Commands per second sent by the clients (together).
    #[arg(long, default_value_t = 30)]
    pub rate: u32,
    /// Seed of the fault schedule and the load.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The nisshi broker binary (the chaos run starts, kills and restarts its own broker).
    #[arg(long, env = "NISSHI_BIN")]
    pub nisshi: PathBuf,
    /// Shell command that restarts PostgreSQL (e.g. `pg_ctlcluster --skip-systemctl-redirect 15 main restart`);
    /// without it PostgreSQL is not restarted.
    #[arg(long)]
    pub postgres_restart: Option<String>,
    /// Keep the database and the logs afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// One process of the system under test.
struct Component {
    name: &'static str,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

struct Cluster {
    exe: PathBuf,
    env: Vec<(String, String)>,
    logs: PathBuf,
    components: Vec<Component>,
}

impl Cluster {
    fn spawn(&self, component: &mut Component) -> anyhow::Result<()> {
        component.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", component.name)))?;
        let mut command = Command::new(&self.exe);
        command.args(&component.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        // The load trades the demo's symbols: a market configured for this shell must not reach the simulator.
        command.env_remove("LEDGER_SYMBOLS");
        for (name, value) in &self.env {
            command.env(name, value);
        }
        component.child = Some(command.spawn().with_context(|| format!("starting {}", component.name))?);
        Ok(())
    }

    fn start_all(&mut self) -> anyhow::Result<()> {
        let mut components = std::mem::take(&mut self.components);
        let result = components.iter_mut().try_for_each(|c| self.spawn(c));
        self.components = components;
        result
    }

    /// SIGKILL, as a crash would.
    async fn kill(&mut self, name: &str) {
        if let Some(component) = self.components.iter_mut().find(|c| c.name == name) {
            if let Some(mut child) = component.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Restarts whatever is not running (killed, or exited on its own).
    fn supervise(&mut self) -> anyhow::Result<Vec<&'static str>> {
        let mut components = std::mem::take(&mut self.components);
        let mut restarted = Vec::new();
        let mut result = Ok(());
        for component in components.iter_mut() {
            let down = match component.child.as_mut() {
                None => true,
                Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            };
            if down {
                if let Err(error) = self.spawn(component) {
                    result = Err(error);
                }
                restarted.push(component.name);
            }
        }
        self.components = components;
        result.map(|_| restarted)
    }

    /// SIGTERM to every process; waits for them.
    async fn stop_all(&mut self) {
        for component in &mut self.components {
            if let Some(child) = component.child.as_ref().and_then(|c| c.id()) {
                let _ = std::process::Command::new("kill").args(["-TERM", &child.to_string()]).status();
            }
        }
        for component in &mut self.components {
            if let Some(mut child) = component.child.take() {
                if tokio::time::timeout(Duration::from_secs(20), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
    }
}

/// The broker, owned by the run.
struct Broker {
    bin: PathBuf,
    port: u16,
    storage: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log"))?;
        let address = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .args(["broker", "--listener-url", &address, "--advertised-listener-url", &address])
            .args(["--storage-engine", &self.storage, "--group-initial-rebalance-delay", "0s"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the broker {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("the broker did not open port {} within 30 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// What the clients were told.
#[derive(Default)]
struct Ledgerbook {
    /// idempotency key → events the command wrote (as the answer said).
    acknowledged: Mutex<BTreeMap<String, &'static str>>,
    refused: AtomicU64,
    retries: AtomicU64,
    abandoned: AtomicU64,
}

pub async fn run(database_url: &str, args: ChaosArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let work = std::env::temp_dir().join(format!("ledger-chaos-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work)?;
    let (server, _) = database_url.rsplit_once('/').context("DATABASE_URL must name a database")?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("ledger_chaos_{suffix}");
    let broker_database = format!("nisshi_chaos_{suffix}");
    let url = format!("{server}/{database}");
    let admin_url = format!("{server}/postgres");
    {
        let mut admin = PgConnection::connect(&admin_url).await.context("connecting to PostgreSQL")?;
        for name in [&database, &broker_database] {
            sqlx::query(&format!("create database {name}")).execute(&mut admin).await?;
        }
    }
    let pool = crate::support::connect_and_migrate(&url).await?;
    let port = free_port()?;
    let mut broker = Broker {
        bin: args.nisshi.clone(),
        port,
        storage: format!("{server}/{broker_database}?sslmode=disable"),
        dir: work.clone(),
        child: None,
    };
    broker.start().await?;
    let brokers = format!("127.0.0.1:{port}");
    let mut kafka = KafkaConfig::new(&brokers);
    kafka.partitions = 4;
    kafka.ensure_topics().await.context("creating the topics")?;
    let api_ports = [free_port()?, free_port()?];
    let mut cluster = cluster_of(crate::support::ledger_binary()?, &url, &brokers, &work, api_ports);
    cluster.start_all()?;
    let bases: Vec<String> = api_ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    crate::support::wait_ready(&bases).await?;
    println!(
        "chaos: {} s of load at {} commands/s with faults; logs in {}",
        args.duration_secs,
        args.rate,
        work.display()
    );

    // The load: portfolios opened through the API, then deposits, withdrawals and market orders.
    let keys = TokenKeys::new(SECRET).map_err(|e| anyhow::anyhow!(e))?;
    let token = keys.issue("chaos", Role::Trader, chrono::Duration::hours(2), chrono::Utc::now());
    let book = Arc::new(Ledgerbook::default());
    let client = reqwest::Client::builder().timeout(Duration::from_millis(REQUEST_TIMEOUT_MS)).build()?;
    let portfolios = open_funded_portfolios(&client, &bases, &token, &book).await?;
    let stop_load = CancellationToken::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(LOAD_IN_FLIGHT_MAX));
    let target =
        LoadTarget { client: client.clone(), bases: Arc::new(bases), token: Arc::new(token), book: book.clone() };
    let load = spawn_load(&target, portfolios, &args, &stop_load, &in_flight);

    let duration = Duration::from_secs(args.duration_secs.max(10));
    let faults = schedule_faults(&mut rng, duration, &args);
    let log = inject_faults(faults, duration, &mut rng, &mut broker, &mut cluster, &args).await?;
    stop_load.cancel();
    for task in load {
        let _ = task.await;
    }
    // Every request sent has its answer (or gave up) once all the permits are back.
    let _ = in_flight.acquire_many(LOAD_IN_FLIGHT_MAX as u32).await;
    let acknowledged = book.acknowledged.lock().map(|m| m.clone()).unwrap_or_default();
    println!(
        "chaos: load stopped: {} commands acknowledged, {} refused by the ledger, {} retries, {} abandoned at the end",
        acknowledged.len(),
        book.refused.load(Ordering::Relaxed),
        book.retries.load(Ordering::Relaxed),
        book.abandoned.load(Ordering::Relaxed)
    );

    // Let the system settle, then stop it and check.
    cluster.supervise()?;
    let settle = settle(&pool, &kafka, Duration::from_secs(SETTLE_TIMEOUT_SECS.max(args.duration_secs))).await;
    cluster.stop_all().await;
    let mut failures = Vec::new();
    match settle {
        Ok(()) => println!("chaos: ok    the system settled (relay, process manager and projections at the head)"),
        Err(error) => {
            println!("chaos: FAIL  the system did not settle: {error:#}");
            failures.push(format!("the system did not settle: {error:#}"));
        }
    }
    let checks = check_all(&pool, &kafka, &acknowledged).await;
    broker.kill().await;
    for (name, result) in checks {
        match result {
            Ok(detail) => println!("chaos: ok    {name}: {detail}"),
            Err(error) => {
                println!("chaos: FAIL  {name}: {error:#}");
                failures.push(format!("{name}: {error:#}"));
            }
        }
    }
    let restarts: Vec<String> = cluster.components.iter().map(|c| format!("{} ×{}", c.name, c.starts)).collect();
    println!("chaos: process starts: {}", restarts.join(", "));
    println!("chaos: finished in {:.0} s", started.elapsed().as_secs_f64());
    pool.close().await;
    if !args.keep {
        let mut admin = PgConnection::connect(&admin_url).await?;
        for name in [&database, &broker_database] {
            let _ = sqlx::query(&format!("drop database if exists {name} with (force)")).execute(&mut admin).await;
        }
    }
    if failures.is_empty() {
        if !args.keep {
            let _ = std::fs::remove_dir_all(&work);
        }
        println!("chaos: PASSED — nothing lost, nothing doubled");
        Ok(())
    } else {
        println!("chaos: faults: {}", log.join("; "));
        bail!("chaos run failed ({} checks); process logs in {}", failures.len(), work.display())
    }
}

/// Runs the load's `duration`, injecting `faults` at their moments and restarting what is down (as a supervisor
/// would) every few hundred milliseconds; the log of what happened.
async fn inject_faults(
    faults: Vec<(Duration, &'static str)>,
    duration: Duration,
    rng: &mut StdRng,
    broker: &mut Broker,
    cluster: &mut Cluster,
    args: &ChaosArgs,
) -> anyhow::Result<Vec<String>> {
    let load_started = Instant::now();
    let mut log = Vec::new();
    let mut pending = faults.into_iter().peekable();
    while load_started.elapsed() < duration {
        while let Some((when, _)) = pending.peek() {
            if load_started.elapsed() < *when {
                break;
            }
            let (_, fault) = pending.next().context("a fault")?;
            let t = load_started.elapsed().as_secs_f64();
            match fault {
                "restart broker" => {
                    broker.kill().await;
                    tokio::time::sleep(Duration::from_millis(BROKER_DOWN_MS)).await;
                    broker.start().await?;
                }
                "restart postgres" => {
                    let command = args.postgres_restart.as_deref().unwrap_or_default();
                    let status = std::process::Command::new("sh").args(["-c", command]).status()?;
                    if !status.success() {
                        bail!("restarting PostgreSQL failed ({command}): {status}");
                    }
                }
                kill => cluster.kill(kill.trim_start_matches("kill ")).await,
            }
            log.push(format!("{t:6.1} s  {fault}"));
            println!("chaos: {t:6.1} s  {fault}");
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(SUPERVISE_EVERY_MS_MIN..SUPERVISE_EVERY_MS_MAX))).await;
        for name in cluster.supervise()? {
            log.push(format!("{:6.1} s  restarted {name}", load_started.elapsed().as_secs_f64()));
        }
    }
    Ok(log)
}

/// The cluster under test: two API instances and every role, as separate `exe` processes with their logs in
/// `work`.
fn cluster_of(exe: PathBuf, url: &str, brokers: &str, work: &std::path::Path, api_ports: [u16; 2]) -> Cluster {
    let component = |name: &'static str, args: &[&str]| Component {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        child: None,
        starts: 0,
    };
    let listen = |port: u16| format!("127.0.0.1:{port}");
    let (listen_a, listen_b) = (listen(api_ports[0]), listen(api_ports[1]));
    Cluster {
        exe,
        env: vec![
            ("DATABASE_URL".into(), url.to_string()),
            ("KAFKA_BROKERS".into(), brokers.to_string()),
            ("LEDGER_KAFKA_PARTITIONS".into(), "4".into()),
            // PostgreSQL's default 100 connections are shared by eight processes (a pool each, plus the command
            // writer's own 3 in the four that write commands), the broker's storage (nisshi keeps its log in
            // PostgreSQL), the checks, and connections of killed processes not yet torn down. With pools of 8 a
            // 10-minute run at 300 commands/s ran out ("too many clients" in the broker's log) and its workers
            // then consumed at a few messages a second.
            ("LEDGER_DB_CONNECTIONS".into(), "6".into()),
            ("LEDGER_JWT_SECRET".into(), SECRET.into()),
            ("RUST_LOG".into(), "info,sqlx=warn".into()),
        ],
        logs: work.to_path_buf(),
        components: vec![
            component("api-a", &["serve", "--listen", &listen_a]),
            component("api-b", &["serve", "--listen", &listen_b]),
            component("relay", &["relay"]),
            component("process-manager", &["process-manager"]),
            component("workers", &["worker", "all"]),
            component("sealer", &["seal"]),
            component("simulator", &["simulate", "--seed", "3", "--interval-ms", "250"]),
            component("executor", &["executor"]),
        ],
    }
}

/// Four portfolios opened and funded through the API (each request retried until answered), by id.
async fn open_funded_portfolios(
    client: &reqwest::Client,
    bases: &[String],
    token: &str,
    book: &Ledgerbook,
) -> anyhow::Result<Vec<String>> {
    let mut portfolios = Vec::new();
    for n in 0..4 {
        let key = format!("chaos-open-{n}");
        let data = request(client, bases, token, book, &key, "PortfolioOpened",
            "mutation($k: String!) { openPortfolio(input: { baseCurrency: \"USD\" }, idempotencyKey: $k) { aggregateId } }",
            json!({ "k": key }), &CancellationToken::new()).await?;
        let id = data["openPortfolio"]["aggregateId"].as_str().context("an opened portfolio")?.to_string();
        let key = format!("chaos-fund-{n}");
        request(client, bases, token, book, &key, "CashDeposited",
            "mutation($id: UUID!, $k: String!) { deposit(portfolioId: $id, amount: \"100000\", idempotencyKey: $k) { lastPosition } }",
            json!({ "id": id, "k": key }), &CancellationToken::new()).await?;
        portfolios.push(id);
    }
    Ok(portfolios)
}

/// Where the load goes and what it records.
#[derive(Clone)]
struct LoadTarget {
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    token: Arc<String>,
    book: Arc<Ledgerbook>,
}

/// The load's clients, each on its own task, until `stop` fires.
fn spawn_load(
    target: &LoadTarget,
    portfolios: Vec<String>,
    args: &ChaosArgs,
    stop_load: &CancellationToken,
    in_flight: &Arc<tokio::sync::Semaphore>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let clients = 4u32;
    // Open loop: each client sends on a fixed schedule, whatever the answers take, with at most
    // LOAD_IN_FLIGHT_MAX requests waiting for an answer in all (then the schedule waits: the rate achieved is
    // what the system sustains). A closed loop of 4 clients sent at most 4 ÷ latency: ~35/s under faults.
    let mut load = Vec::new();
    for c in 0..clients {
        let LoadTarget { client, bases, token, book } = target.clone();
        let (portfolios, stop, in_flight) = (portfolios.clone(), stop_load.clone(), in_flight.clone());
        let mut rng = StdRng::seed_from_u64(args.seed.wrapping_mul(31).wrapping_add(c as u64));
        let interval = Duration::from_secs_f64(clients as f64 / args.rate.max(1) as f64);
        load.push(tokio::spawn(async move {
            let mut schedule = tokio::time::interval(interval);
            schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = schedule.tick() => {}
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                n += 1;
                let key = format!("chaos-{c}-{n}");
                let portfolio = &portfolios[rng.gen_range(0..portfolios.len())];
                let choice = rng.gen_range(0..10);
                let (kind, query, variables) = if choice < 6 {
                    ("CashDeposited", "mutation($id: UUID!, $a: Decimal!, $k: String!) { deposit(portfolioId: $id, amount: $a, idempotencyKey: $k) { lastPosition } }",
                        json!({ "id": portfolio, "a": rng.gen_range(1..100).to_string(), "k": key }))
                } else if choice < 7 {
                    ("CashWithdrawn", "mutation($id: UUID!, $a: Decimal!, $k: String!) { withdraw(portfolioId: $id, amount: $a, idempotencyKey: $k) { lastPosition } }",
                        json!({ "id": portfolio, "a": rng.gen_range(1..50).to_string(), "k": key }))
                } else {
                    let symbol = ["ACME", "GLOBEX", "INITECH"][rng.gen_range(0..3)];
                    ("OrderPlaced", "mutation($input: PlaceOrderInput!, $k: String!) { placeOrder(input: $input, idempotencyKey: $k) { orderId } }",
                        json!({ "input": { "portfolioId": portfolio, "symbol": symbol, "side": "BUY", "type": "MARKET", "quantity": "1" }, "k": key }))
                };
                let (client, bases, token, book, stop) =
                    (client.clone(), bases.clone(), token.clone(), book.clone(), stop.clone());
                tokio::spawn(async move {
                    let _ = request(&client, &bases, &token, &book, &key, kind, query, variables, &stop).await;
                    drop(permit);
                });
            }
        }));
    }
    load
}

/// The faults, at seeded moments within the run, in time order.
fn schedule_faults(rng: &mut StdRng, duration: Duration, args: &ChaosArgs) -> Vec<(Duration, &'static str)> {
    let at = |rng: &mut StdRng, from: f64, to: f64| duration.mul_f64(rng.gen_range(from..to));
    let mut faults: Vec<(Duration, &'static str)> = Vec::new();
    for _ in 0..(args.duration_secs / 20).max(1) {
        faults.push((at(rng, 0.05, 0.9), "kill relay"));
        faults.push((at(rng, 0.05, 0.9), "kill workers"));
        faults.push((at(rng, 0.05, 0.9), if rng.gen_bool(0.5) { "kill api-a" } else { "kill api-b" }));
    }
    faults.push((at(rng, 0.2, 0.5), "restart broker"));
    if args.postgres_restart.is_some() {
        faults.push((at(rng, 0.55, 0.8), "restart postgres"));
    }
    faults.sort();
    faults
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends one mutation, retrying (same key, either instance) until it is answered or refused.
#[allow(clippy::too_many_arguments)]
async fn request(
    client: &reqwest::Client,
    bases: &[String],
    token: &str,
    book: &Ledgerbook,
    key: &str,
    kind: &'static str,
    query: &str,
    variables: Value,
    stop: &CancellationToken,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(REQUEST_RETRY_SECS);
    // Spread requests over the instances by key; a retry goes to the next instance.
    let first = key.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    let mut attempt = 0usize;
    loop {
        let base = &bases[first.wrapping_add(attempt) % bases.len()];
        attempt += 1;
        let response = client
            .post(format!("{base}/graphql"))
            .bearer_auth(token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await;
        let body: Option<Value> = match response {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        if let Some(body) = body {
            let code = body["errors"][0]["extensions"]["code"].as_str().map(str::to_string);
            match code {
                None if body["data"].is_object() => {
                    if let Ok(mut acknowledged) = book.acknowledged.lock() {
                        acknowledged.insert(key.to_string(), kind);
                    }
                    return Ok(body["data"].clone());
                }
                // A business refusal is an answer too: nothing was written.
                Some(code) if !matches!(code.as_str(), "INTERNAL" | "CONTENTION" | "RATE_LIMITED" | "UNAVAILABLE") => {
                    book.refused.fetch_add(1, Ordering::Relaxed);
                    bail!("refused: {code}");
                }
                _ => {}
            }
        }
        book.retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() > deadline || (stop.is_cancelled() && attempt > 50) {
            book.abandoned.fetch_add(1, Ordering::Relaxed);
            bail!("no answer for {key}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Check = (&'static str, anyhow::Result<String>);

async fn check_all(pool: &PgPool, kafka: &KafkaConfig, acknowledged: &BTreeMap<String, &'static str>) -> Vec<Check> {
    vec![
        ("acknowledged commands are in the log exactly once", check_acknowledged(pool, acknowledged).await),
        ("the events topic holds every event", check_topic(pool, kafka).await),
        ("every read model equals a fresh rebuild", check_rebuild(pool).await),
        ("portfolio invariants", check_invariants(pool).await),
        ("orders and portfolios agree", check_agreement(pool).await),
        ("the audit chain verifies", check_audit(pool).await),
    ]
}

async fn check_acknowledged(pool: &PgPool, acknowledged: &BTreeMap<String, &'static str>) -> anyhow::Result<String> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select metadata->>'idempotency_key', min(event_type), count(*) from events
          where metadata->>'actor' = 'chaos' and metadata ? 'idempotency_key' group by 1",
    )
    .fetch_all(pool)
    .await?;
    let stored: HashMap<String, (String, i64)> = rows.into_iter().map(|(k, t, n)| (k, (t, n))).collect();
    let mut problems = Vec::new();
    for (key, kind) in acknowledged {
        match stored.get(key) {
            None => problems.push(format!("{key}: acknowledged, not in the log")),
            Some((event_type, n)) if *n != 1 || event_type != kind => {
                problems.push(format!("{key}: {n} events of type {event_type}, expected one {kind}"))
            }
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        bail!("{} problems, first: {}", problems.len(), problems[..problems.len().min(5)].join("; "));
    }
    Ok(format!("{} commands checked ({} keyed commands in the log)", acknowledged.len(), stored.len()))
}

async fn check_topic(pool: &PgPool, kafka: &KafkaConfig) -> anyhow::Result<String> {
    let log: HashSet<String> = sqlx::query_scalar::<_, uuid::Uuid>("select event_id from events")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    let kafka = kafka.clone();
    let seen = tokio::task::spawn_blocking(move || -> anyhow::Result<(HashSet<String>, u64)> {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set("group.id", format!("chaos-check-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&kafka.events_topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0) as i32;
        let mut ends = HashMap::new();
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&kafka.events_topic, partition, Duration::from_secs(10))?;
            if high > low {
                ends.insert(partition, high);
                assignment.add_partition_offset(&kafka.events_topic, partition, rdkafka::Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let mut seen = HashSet::new();
        let mut messages = 0u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ends.is_empty() {
            if Instant::now() > deadline {
                bail!("reading the topic timed out with {} partitions unread", ends.len());
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
            let message = message?;
            messages += 1;
            if let Some(headers) = message.headers() {
                for header in headers.iter() {
                    if header.key == ledger::relay::headers::EVENT_ID {
                        if let Some(value) = header.value {
                            seen.insert(String::from_utf8_lossy(value).into_owned());
                        }
                    }
                }
            }
            if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                ends.remove(&message.partition());
            }
        }
        Ok((seen, messages))
    })
    .await??;
    let (seen, messages) = seen;
    let missing: Vec<&String> = log.difference(&seen).collect();
    if !missing.is_empty() {
        bail!("{} of {} events missing from the topic (e.g. {})", missing.len(), log.len(), missing[0]);
    }
    Ok(format!("{} events, {} messages (duplicates from retries are allowed: at least once)", log.len(), messages))
}

async fn check_rebuild(pool: &PgPool) -> anyhow::Result<String> {
    let settings = ledger::projections::ProjectionSettings::default();
    let projections = ledger::projections::all(&settings);
    let reports = ledger::projections::rebuild::rebuild_together(
        pool,
        &projections,
        ledger::projections::rebuild::RebuildMode::Verify,
        Default::default(),
        &mut |_, _| {},
    )
    .await
    .context("rebuilding every projection")?;
    let differences: Vec<String> = reports
        .iter()
        .filter(|report| !report.differences.is_empty())
        .map(|report| format!("{}: {:?}", report.projection, report.differences))
        .collect();
    if !differences.is_empty() {
        bail!("{}", differences.join("; "));
    }
    let names: Vec<&str> = reports.iter().map(|report| report.projection).collect();
    Ok(format!("{} identical", names.join(", ")))
}

async fn check_invariants(pool: &PgPool) -> anyhow::Result<String> {
    let commands = CommandService::new(pool.clone(), CommandConfig::default());
    let ids: Vec<String> =
        sqlx::query_scalar("select distinct aggregate_id from events where aggregate_type = 'Portfolio'")
            .fetch_all(pool)
            .await?;
    let mut problems = Vec::new();
    let mut in_deficit = 0;
    for id in &ids {
        let (portfolio, _) = commands.load::<Portfolio>(id).await?;
        if let Err(violation) = portfolio.check_invariants() {
            problems.push(format!("{id}: {violation}"));
        }
        in_deficit += usize::from(portfolio.deficit() > rust_decimal::Decimal::ZERO);
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(format!("{} portfolios ({in_deficit} in deficit)", ids.len()))
}

async fn check_agreement(pool: &PgPool) -> anyhow::Result<String> {
    let commands = CommandService::new(pool.clone(), CommandConfig::default());
    let disagreements = ledger::process::agreement::check(&commands).await?;
    if !disagreements.is_empty() {
        let shown: Vec<String> = disagreements.iter().take(10).map(ToString::to_string).collect();
        bail!("{} disagreements: {}", disagreements.len(), shown.join("; "));
    }
    let orders: i64 =
        sqlx::query_scalar("select count(distinct aggregate_id) from events where aggregate_type = 'Order'")
            .fetch_one(pool)
            .await?;
    Ok(format!("{orders} orders"))
}

async fn check_audit(pool: &PgPool) -> anyhow::Result<String> {
    ledger::audit::seal_until_head(pool).await?;
    let report = ledger::audit::verify_db(pool, &mut |_, _| {}).await?;
    Ok(report.summary())
}
