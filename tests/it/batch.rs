//! Batched intake (`CommandService::execute_batch`) against a real PostgreSQL: one transaction for the batch,
//! per-command refusals that leave no trace, idempotency per command, snapshots, and concurrent writers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ledger::commands::{BatchItem, CommandConfig, CommandError, CommandService, Idempotency, BATCH_COMMANDS_MAX};
use ledger::domain::values::PortfolioId;
use ledger::domain::{CostBasisMethod, Portfolio, PortfolioCommand};
use rust_decimal::Decimal;

use crate::support::*;

/// A fixed time, so that the same command fingerprints the same.
fn at() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_764_633_600, 0).unwrap()
}

fn deposit(s: &str) -> PortfolioCommand {
    PortfolioCommand::DepositCash { amount: amount(s), reference: None, at: at() }
}

fn withdraw(s: &str) -> PortfolioCommand {
    PortfolioCommand::WithdrawCash { amount: amount(s), reference: None, at: at() }
}

fn item(portfolio: PortfolioId, command: PortfolioCommand, key: Option<&str>) -> BatchItem<PortfolioCommand> {
    let idempotency = key.map(|k| Idempotency::new(k, &format!("{command:?}")).unwrap());
    BatchItem { aggregate_id: portfolio.to_string(), command, idempotency, cause: None }
}

fn allow(_: &Portfolio) -> Result<(), CommandError> {
    Ok(())
}

async fn cash(commands: &CommandService, portfolio: PortfolioId) -> (Decimal, usize) {
    let (state, sequence) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    (state.cash, sequence)
}

#[tokio::test]
async fn a_batch_commits_in_one_transaction_and_a_refusal_leaves_no_trace() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let a = open_portfolio(&commands, "100", CostBasisMethod::Fifo).await;
    let b = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
    let items = vec![
        item(a, withdraw("60"), Some("k1")),
        item(b, deposit("5"), Some("k2")),
        item(a, withdraw("60"), Some("k3")), // 40 left after the first: refused
        item(a, deposit("1.5"), None),
        item(b, withdraw("5"), Some("k4")), // sees the deposit of this batch
    ];
    let results = commands.execute_batch::<Portfolio>(&ctx(), items, allow).await.unwrap();
    assert_eq!(results.len(), 5);
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok() && results[4].is_ok());
    assert_eq!(results[2].as_ref().unwrap_err().code(), "INSUFFICIENT_FUNDS");
    assert_eq!(cash(&commands, a).await, (dec("41.5"), 4));
    assert_eq!(cash(&commands, b).await, (dec("0"), 3));

    // Sequences follow the order of the batch; every event in one transaction.
    let outcome = |n: usize| results[n].as_ref().unwrap();
    assert_eq!(outcome(0).events[0].sequence, 3);
    assert_eq!(outcome(3).events[0].sequence, 4);
    assert_eq!(outcome(1).events[0].sequence, 2);
    assert_eq!(outcome(4).events[0].sequence, 3);
    let transactions: i64 =
        sqlx::query_scalar("select count(distinct transaction_id::text) from events where event_id = any($1)")
            .bind([0, 1, 3, 4].map(|n| outcome(n).events[0].event_id).to_vec())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(transactions, 1);
    let logged: i64 = sqlx::query_scalar("select count(*) from command_log where idempotency_key like 'k%'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(logged, 3, "a refused command records no idempotency row");
    let metrics = commands.metrics();
    assert_eq!(metrics.batches.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.rejected.load(Ordering::Relaxed), 1);
    db.drop().await;
}

#[tokio::test]
async fn a_repeated_batch_answers_from_the_log_and_writes_nothing() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let a = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    let batch = || vec![item(a, deposit("1"), Some("r1")), item(a, deposit("2"), Some("r2"))];
    let first = commands.execute_batch::<Portfolio>(&ctx(), batch(), allow).await.unwrap();
    let again = commands.execute_batch::<Portfolio>(&ctx(), batch(), allow).await.unwrap();
    for (first, again) in first.iter().zip(&again) {
        let (first, again) = (first.as_ref().unwrap(), again.as_ref().unwrap());
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(first.events, again.events);
    }
    assert_eq!(cash(&commands, a).await, (dec("13"), 4));

    // A different request under a used key, and a key used twice in one batch.
    let mixed = vec![
        item(a, deposit("9"), Some("r1")),
        item(a, deposit("4"), Some("r3")),
        item(a, deposit("4"), Some("r3")),
        BatchItem { aggregate_id: String::new(), command: deposit("1"), idempotency: None, cause: None },
    ];
    let results = commands.execute_batch::<Portfolio>(&ctx(), mixed, allow).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap_err().code(), "IDEMPOTENCY_KEY_REUSED");
    assert!(results[1].is_ok());
    assert_eq!(results[2].as_ref().unwrap_err().code(), "INVALID_INPUT");
    assert_eq!(results[3].as_ref().unwrap_err().code(), "INVALID_INPUT");
    assert_eq!(cash(&commands, a).await, (dec("17"), 5));

    let too_many: Vec<_> = (0..=BATCH_COMMANDS_MAX).map(|_| item(a, deposit("1"), None)).collect();
    let refused = commands.execute_batch::<Portfolio>(&ctx(), too_many, allow).await;
    assert!(matches!(refused, Err(CommandError::Invalid(_))));
    assert_eq!(cash(&commands, a).await, (dec("17"), 5));
    db.drop().await;
}

#[tokio::test]
async fn the_authorize_check_refuses_per_command_with_its_code() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let mine = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
    let unknown = PortfolioId::generate();
    let only_opened = |portfolio: &Portfolio| match portfolio.terms {
        Some(_) => Ok(()),
        None => Err(CommandError::Refused { code: "PORTFOLIO_NOT_FOUND", message: "no such portfolio".into() }),
    };
    let items = vec![item(unknown, deposit("1"), None), item(mine, deposit("1"), None)];
    let results = commands.execute_batch::<Portfolio>(&ctx(), items, only_opened).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap_err().code(), "PORTFOLIO_NOT_FOUND");
    assert!(results[1].is_ok());
    let stray: i64 = sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(unknown.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stray, 0);
    db.drop().await;
}

/// A batch crossing the snapshot interval writes the snapshot of the state after the command that reached it,
/// as single commands do, and loading with or without snapshots agrees.
#[tokio::test]
async fn batches_write_snapshots_like_single_commands() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let a = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
    for round in 0..3 {
        let items: Vec<_> = (0..40).map(|i| item(a, deposit(&format!("1{round}.{i:02}")), None)).collect();
        let results = commands.execute_batch::<Portfolio>(&ctx(), items, allow).await.unwrap();
        assert!(results.iter().all(Result::is_ok));
    }
    let last_sequence: i64 = sqlx::query_scalar(
        "select last_sequence from snapshots where aggregate_type = 'Portfolio' and aggregate_id = $1",
    )
    .bind(a.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, 100, "the snapshot holds the state after the command that reached 100");
    let (with_snapshot, sequence) = commands.load::<Portfolio>(&a.to_string()).await.unwrap();
    assert_eq!(sequence, 121);
    sqlx::query("delete from snapshots").execute(&db.pool).await.unwrap();
    let (from_events, _) = commands.load::<Portfolio>(&a.to_string()).await.unwrap();
    assert_eq!(with_snapshot, from_events);
    // A batch after the snapshot is gone loads from the events alone.
    let results = commands.execute_batch::<Portfolio>(&ctx(), vec![item(a, deposit("1"), None)], allow).await.unwrap();
    assert_eq!(results[0].as_ref().unwrap().events[0].sequence, 122);
    db.drop().await;
}

/// Batches on one service and single commands on another (as another process, with no shared in-process
/// queue) on the same portfolios: conflicts send the batch down the one-by-one path; nothing is lost or
/// doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_racing_other_writers_lose_nothing() {
    let db = TestDb::new().await;
    let batcher = db.commands();
    let other = Arc::new(CommandService::new(db.pool.clone(), CommandConfig::default()));
    let mut portfolios = Vec::new();
    for _ in 0..4 {
        portfolios.push(open_portfolio(&batcher, "0", CostBasisMethod::Fifo).await);
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let singles = {
        let (other, portfolios, done) = (other.clone(), portfolios.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) || n < 100 {
                let p = portfolios[n % portfolios.len()];
                other.execute_portfolio(&ctx(), p, deposit("0.01")).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let mut accepted = 0;
    for round in 0..40 {
        let items: Vec<_> = (0..20)
            .map(|i| item(portfolios[i % portfolios.len()], deposit("1"), Some(&format!("race-{round}-{i}"))))
            .collect();
        let results = batcher.execute_batch::<Portfolio>(&ctx(), items, allow).await.unwrap();
        for result in results {
            result.unwrap();
            accepted += 1;
        }
    }
    done.store(true, Ordering::SeqCst);
    let singles = singles.await.unwrap();
    let mut total = Decimal::ZERO;
    let mut events = 0;
    for p in &portfolios {
        let (cash, sequence) = cash(&batcher, *p).await;
        total += cash;
        events += sequence;
    }
    assert_eq!(accepted, 800);
    assert_eq!(total, Decimal::from(800) + Decimal::new(singles as i64, 2));
    assert_eq!(events, 4 + 800 + singles);
    db.drop().await;
}

/// A writer whose insert is still uncommitted when the batch commits: the batch's insert waits for it, then
/// conflicts; nothing of the batch is written, and every command runs again one by one on the new state — the
/// withdrawal the batch had refused now succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflicting_writer_sends_the_batch_down_the_one_by_one_path() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let a = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    let other = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
    // The other writer: a deposit of 100 at sequence 3, held uncommitted.
    let mut writer = db.pool.begin().await.unwrap();
    insert_foreign_deposit(&mut writer, a, 3, "100", "110", at()).await;
    let batch = {
        let commands = commands.clone();
        tokio::spawn(async move {
            let items = vec![
                item(other, deposit("1"), Some("c1")),
                item(a, deposit("1"), Some("c2")),
                item(a, withdraw("50"), Some("c3")),
            ];
            commands.execute_batch::<Portfolio>(&ctx(), items, allow).await.unwrap()
        })
    };
    // The batch refuses the withdrawal against the state it can see (cash 11) and blocks on the insert.
    let blocked = eventually(|| async {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_stat_activity
                             where datname = current_database() and wait_event_type = 'Lock')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(blocked, "the batch's insert should wait for the uncommitted writer");
    assert!(!batch.is_finished());
    writer.commit().await.unwrap();
    let results = batch.await.unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap().events[0].sequence, 4, "the deposit ran after the other writer's");
    assert_eq!(results[2].as_ref().unwrap().events[0].sequence, 5, "the withdrawal was decided again");
    assert_eq!(cash(&commands, a).await, (dec("61"), 5));
    assert_eq!(cash(&commands, other).await, (dec("1"), 2));
    assert_eq!(commands.metrics().conflicts.load(Ordering::Relaxed), 1);
    db.drop().await;
}

/// One aggregate's commands reach the log in the batch's order: when one fails for want of the database (here a
/// trigger refuses its row), the later ones of its aggregate are answered with a failure, not run on a state
/// without it — and the batch run again under the same keys applies them in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_failure_the_later_commands_of_its_aggregate_wait_for_the_batch_to_run_again() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = open_portfolio(&commands, "20", CostBasisMethod::Fifo).await;
    sqlx::raw_sql(
        "create function refuse_13() returns trigger language plpgsql as $$
         begin
           if new.payload->'CashWithdrawn'->>'amount' = '13' then raise exception 'test: a row the database refuses'; end if;
           return new;
         end $$;
         create trigger refuse_13 before insert on events for each row execute function refuse_13();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // The second withdrawal is refused on the state after the first (7 left); run on the state without it (20),
    // it would go through, and the first would then be refused when the batch runs again.
    let batch = || vec![item(portfolio, withdraw("13"), Some("k13")), item(portfolio, withdraw("10"), Some("k10"))];
    let results = commands.execute_batch::<Portfolio>(&ctx(), batch(), allow).await.unwrap();
    assert!(results[0].as_ref().is_err_and(|e| !e.is_business()), "{:?}", results[0]);
    assert!(results[1].as_ref().is_err_and(|e| !e.is_business()), "ran without the first: {:?}", results[1]);
    assert_eq!(cash(&commands, portfolio).await.0, dec("20"));
    // The same with a later command that writes: refused by the writer with its failed predecessor (in the same
    // group or a later one), not written after it.
    let writes = vec![item(portfolio, withdraw("13"), Some("w13")), item(portfolio, withdraw("1"), Some("w1"))];
    let results = commands.execute_batch::<Portfolio>(&ctx(), writes, allow).await.unwrap();
    assert!(results.iter().all(|r| r.as_ref().is_err_and(|e| !e.is_business())), "{results:?}");
    assert_eq!(cash(&commands, portfolio).await.0, dec("20"));

    sqlx::query("drop trigger refuse_13 on events").execute(&db.pool).await.unwrap();
    let results = commands.execute_batch::<Portfolio>(&ctx(), batch(), allow).await.unwrap();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(matches!(results[1], Err(CommandError::Portfolio(_))), "{:?}", results[1]);
    assert_eq!(cash(&commands, portfolio).await.0, dec("7"));
    db.drop().await;
}
