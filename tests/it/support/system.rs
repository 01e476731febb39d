//! The running system for a test: process manager, relay and projection workers as tasks that can be killed
//! (aborted) and restarted, plus a trading workload driven through the command service.

use std::sync::Arc;

use ledger::commands::CommandService;
use ledger::domain::order::RecordExecution;
use ledger::domain::values::{ExecId, Money, OrderId, PortfolioId};
use ledger::domain::{CostBasisMethod, Order, OrderCommand, OrderStatus, Side};
use ledger::kafka::KafkaConfig;
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::projections::worker::{ProjectionWorker, WorkerConfig, WorkerStatus};
use ledger::projections::{by_name, Projection, ProjectionSettings};
use ledger::relay::{Relay, RelayConfig};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ctx, dec, eventually, open_portfolio, place, text};

/// A background task that can be stopped gracefully or killed.
pub struct Running {
    pub cancel: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub fn spawn<F>(future: impl FnOnce(CancellationToken) -> F) -> Running
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(future(cancel.clone()));
        Running { cancel, task }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }

    /// Aborts the task at whatever await point it is (a hard kill of that component).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub fn start_process_manager(commands: Arc<CommandService>) -> Running {
    Running::spawn(|cancel| async move {
        let _ = ProcessManager::new(commands, ProcessConfig::default()).run(cancel).await;
    })
}

pub fn start_relay(pool: PgPool, kafka: KafkaConfig) -> Running {
    Running::spawn(|cancel| async move {
        let _ = Relay::new(pool, kafka, RelayConfig::default()).run(cancel).await;
    })
}

pub fn projection(name: &str) -> Arc<dyn Projection> {
    by_name(name, &ProjectionSettings::default()).expect("a projection name")
}

/// Starts a worker; returns it with its status.
pub fn start_worker(pool: PgPool, kafka: KafkaConfig, name: &str, group_prefix: &str) -> (Running, Arc<WorkerStatus>) {
    let config = WorkerConfig { group_prefix: group_prefix.to_string(), ..WorkerConfig::default() };
    let worker = ProjectionWorker::new(pool, kafka, projection(name), config);
    let status = worker.status();
    let running = Running::spawn(|cancel| async move {
        let _ = worker.run(cancel).await;
    });
    (running, status)
}

/// What a trading workload did.
#[derive(Debug, Default)]
pub struct TradingSummary {
    pub portfolios: Vec<PortfolioId>,
    pub orders: Vec<OrderId>,
    pub fills: usize,
}

/// Opens portfolios, places limit orders (buys and sells), and as the process manager accepts them records
/// one or two fills or a cancel. Needs the process manager running.
pub async fn trade(
    commands: &CommandService,
    symbols: &[&str],
    portfolios: usize,
    orders: usize,
    seed: u64,
) -> TradingSummary {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut summary = TradingSummary::default();
    for i in 0..portfolios {
        let method = if i % 2 == 0 { CostBasisMethod::Fifo } else { CostBasisMethod::AverageCost };
        summary.portfolios.push(open_portfolio(commands, "100000", method).await);
    }
    let mut pending = Vec::new();
    for n in 0..orders {
        let portfolio = summary.portfolios[rng.gen_range(0..portfolios)];
        let symbol = symbols[rng.gen_range(0..symbols.len())];
        // Mostly buys, so that sells usually find something to sell.
        let side = if n < orders / 3 || rng.gen_ratio(2, 3) { Side::Buy } else { Side::Sell };
        let quantity = rng.gen_range(1..=20).to_string();
        let limit = format!("{}.{:02}", rng.gen_range(90..110), rng.gen_range(0..100));
        let (order_id, command) = place(portfolio, symbol, side, &quantity, Some(&limit));
        commands.execute_order(&ctx(), order_id, command).await.unwrap();
        pending.push((order_id, limit, rng.gen_range(0..4)));
        summary.orders.push(order_id);
    }
    for (order_id, limit, choice) in pending {
        let decided = eventually(|| async {
            commands.load::<Order>(&order_id.to_string()).await.unwrap().0.status != OrderStatus::PendingNew
        })
        .await;
        assert!(decided, "order {order_id} never decided");
        let (order, _) = commands.load::<Order>(&order_id.to_string()).await.unwrap();
        if order.status != OrderStatus::New {
            continue;
        }
        let leaves = order.leaves_quantity;
        let fill = |exec: &str, quantity: rust_decimal::Decimal| {
            OrderCommand::RecordExecution(RecordExecution {
                exec_id: ExecId::new(exec).unwrap(),
                quantity: ledger::domain::values::Quantity::new(quantity).unwrap(),
                price: ledger::domain::values::Price::new(dec(&limit)).unwrap(),
                fee: Money::new(dec("0.25")).unwrap(),
                executed_at: chrono::Utc::now(),
            })
        };
        match choice {
            0 => {
                let cancel = OrderCommand::CancelOrder { reason: text("test"), canceled_at: chrono::Utc::now() };
                commands.execute_order(&ctx(), order_id, cancel).await.unwrap();
            }
            1 if leaves > dec("1") => {
                commands.execute_order(&ctx(), order_id, fill("f1", dec("1"))).await.unwrap();
                commands.execute_order(&ctx(), order_id, fill("f2", leaves - dec("1"))).await.unwrap();
                summary.fills += 2;
            }
            _ => {
                commands.execute_order(&ctx(), order_id, fill("f1", leaves)).await.unwrap();
                summary.fills += 1;
            }
        }
    }
    summary
}
