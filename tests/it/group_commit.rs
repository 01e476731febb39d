//! Group commit and the aggregate cache against a real PostgreSQL: one statement for many commands, each of
//! them keeping its own guarantees — a conflicting one retried alone, a refused one leaving no trace, a repeat
//! answered from the log — and a cache that never decides on a state older than the log.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ledger::commands::{CommandConfig, CommandError, CommandService};
use ledger::domain::{CostBasisMethod, Portfolio, PortfolioCommand};

use crate::support::*;

fn deposit(value: &str) -> PortfolioCommand {
    PortfolioCommand::DepositCash { amount: amount(value), reference: None, at: chrono::Utc::now() }
}

fn withdraw(value: &str) -> PortfolioCommand {
    PortfolioCommand::WithdrawCash { amount: amount(value), reference: None, at: chrono::Utc::now() }
}

async fn cash(commands: &CommandService, id: ledger::domain::values::PortfolioId) -> rust_decimal::Decimal {
    commands.load::<Portfolio>(&id.to_string()).await.unwrap().0.cash
}

/// A group in which one command conflicts (another process wrote its aggregate) and the others are fine, while
/// a refused command beside them leaves no trace: the others commit, the conflicting one is decided again on
/// the fresh state and commits. The group is formed for certain: the committer is held up by a transaction
/// of another writer while the commands queue behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_with_a_conflict_and_a_refusal_commits_the_rest_and_retries_the_conflict() {
    let db = TestDb::new_with(16).await;
    let commands = db.commands();
    let other_process = Arc::new(CommandService::new(db.pool.clone(), CommandConfig::default()));
    // Two blockers: the committer writes up to two groups at once (on different aggregates).
    let blockers = [
        open_portfolio(&commands, "10", CostBasisMethod::Fifo).await,
        open_portfolio(&commands, "10", CostBasisMethod::Fifo).await,
    ];
    let stale = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    let poor = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    let fine: Vec<_> = {
        let mut fine = Vec::new();
        for _ in 0..3 {
            fine.push(open_portfolio(&commands, "10", CostBasisMethod::Fifo).await);
        }
        fine
    };
    // Another process writes `stale`: this service's cached state of it is now behind the log.
    other_process.execute_portfolio(&ctx(), stale, deposit("100")).await.unwrap();

    // Another writer's transaction holds each blocker's next sequence: the committer's statements for them wait.
    let mut foreign = db.pool.begin().await.unwrap();
    for blocker in &blockers {
        insert_foreign_deposit(&mut foreign, *blocker, 3, "5", "15", chrono::Utc::now()).await;
    }
    let spawn = |id: ledger::domain::values::PortfolioId, command: PortfolioCommand| {
        let commands = commands.clone();
        tokio::spawn(async move { commands.execute_portfolio(&ctx(), id, command).await })
    };
    let mut held = Vec::new();
    for (n, blocker) in blockers.iter().enumerate() {
        held.push(spawn(*blocker, deposit("1")));
        let waiting = eventually(|| async {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
                > n as i64
        })
        .await;
        assert!(waiting, "the committer never waited for the foreign transaction ({} groups)", n + 1);
    }

    // Behind it: a command on the stale aggregate, three fine ones, and a refusal (which writes nothing).
    let conflicting = spawn(stale, deposit("1"));
    let fine_tasks: Vec<_> = fine.iter().map(|id| spawn(*id, deposit("2"))).collect();
    let refused = commands.execute_portfolio(&ctx(), poor, withdraw("11")).await;
    assert!(matches!(refused, Err(CommandError::Portfolio(_))), "{refused:?}");
    assert!(eventually(|| async { commands.writer_queued() >= 4 }).await, "the commands never queued up");
    let fallbacks_before = commands.metrics().group_fallbacks.load(Ordering::Relaxed);
    foreign.commit().await.unwrap();

    for task in held {
        assert_eq!(task.await.unwrap().unwrap().events[0].sequence, 4, "decided again after the foreign event");
    }
    let conflicting = conflicting.await.unwrap().unwrap();
    assert_eq!(conflicting.events[0].sequence, 4, "decided again after the other process's deposit");
    for (task, id) in fine_tasks.into_iter().zip(&fine) {
        assert_eq!(task.await.unwrap().unwrap().events[0].sequence, 3);
        assert_eq!(cash(&commands, *id).await, dec("12"));
    }
    assert_eq!(cash(&commands, stale).await, dec("111"));
    for blocker in blockers {
        assert_eq!(cash(&commands, blocker).await, dec("16"));
    }
    let poor_events: i64 = sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(poor.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(poor_events, 2, "the refused withdrawal left no trace");
    assert!(commands.metrics().group_fallbacks.load(Ordering::Relaxed) > fallbacks_before, "no group conflicted");
    db.drop().await;
}

/// A command repeated with its key after its group committed gets the first answer; under another request the
/// key is refused. Many keyed commands at once (so that they share groups), then all of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_commands_repeated_after_their_group_committed_get_the_first_answer() {
    let db = TestDb::new_with(16).await;
    let commands = db.commands();
    let ids: Vec<_> = {
        let mut ids = Vec::new();
        for _ in 0..8 {
            ids.push(open_portfolio(&commands, "0", CostBasisMethod::Fifo).await);
        }
        ids
    };
    let run = || {
        let tasks: Vec<_> = (0..64)
            .map(|n| {
                let (commands, id) = (commands.clone(), ids[n % ids.len()]);
                tokio::spawn(async move {
                    let key = format!("group-{n}");
                    let context = keyed(&key, &("deposit", n));
                    commands.execute_portfolio(&context, id, deposit("1")).await.unwrap()
                })
            })
            .collect::<Vec<_>>();
        async move {
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            outcomes
        }
    };
    let first = run().await;
    let again = run().await;
    assert!(first.iter().all(|o| !o.duplicate) && again.iter().all(|o| o.duplicate));
    assert_eq!(
        first,
        again
            .iter()
            .cloned()
            .map(|mut o| {
                o.duplicate = false;
                o
            })
            .collect::<Vec<_>>()
    );
    for id in &ids {
        assert_eq!(cash(&commands, *id).await, dec("8"), "one effect per key");
    }
    let other_request = keyed("group-0", &("deposit", 999));
    let reused = commands.execute_portfolio(&other_request, ids[0], deposit("1")).await;
    assert!(matches!(reused, Err(CommandError::IdempotencyKeyReused { .. })), "{reused:?}");
    let mean = commands.metrics().group_commands.load(Ordering::Relaxed) as f64
        / commands.metrics().group_commits.load(Ordering::Relaxed).max(1) as f64;
    eprintln!("mean group size {mean:.1}");
    db.drop().await;
}

/// The cache never decides on a state older than the log: a write by another process is seen by the next
/// command here — one that would be refused on the cached state succeeds, one that writes goes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_never_serves_a_state_older_than_the_log() {
    let db = TestDb::new().await;
    let here = db.commands();
    let elsewhere = Arc::new(CommandService::new(db.pool.clone(), CommandConfig::default()));
    let id = open_portfolio(&here, "10", CostBasisMethod::Fifo).await;
    here.execute_portfolio(&ctx(), id, deposit("1")).await.unwrap(); // cached here: cash 11
    let hits = here.metrics().cache_hits.load(Ordering::Relaxed);
    assert!(hits > 0, "the deposit decided on the cached state");

    elsewhere.execute_portfolio(&ctx(), id, deposit("100")).await.unwrap();
    // Refused on the cached 11, allowed on the log's 111.
    let withdrawn = here.execute_portfolio(&ctx(), id, withdraw("50")).await.unwrap();
    assert_eq!(withdrawn.events[0].sequence, 5);
    elsewhere.execute_portfolio(&ctx(), id, deposit("1000")).await.unwrap();
    // Written on the cached state, conflicts, is decided again after the other process's event.
    let deposited = here.execute_portfolio(&ctx(), id, deposit("1")).await.unwrap();
    assert_eq!(deposited.events[0].sequence, 7);
    let (state, sequence) = here.load::<Portfolio>(&id.to_string()).await.unwrap();
    assert_eq!((state.cash, sequence), (dec("1062"), 7));
    db.drop().await;
}

/// The last resort of a starved command: after `retry_exclusive_after` conflicts it is decided and written in
/// one transaction that holds `events` against every other writer. Here one conflict is enough: the command
/// decides on a stale cache (another process wrote since), conflicts, then waits for the table lock behind an
/// uncommitted writer of another aggregate — it cannot write before that writer is done — and commits on the
/// fresh state once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_starved_command_takes_the_log_exclusively_and_cannot_lose_again() {
    let db = TestDb::new().await;
    let config = CommandConfig { retry_lock_after: 1, retry_exclusive_after: 1, ..CommandConfig::default() };
    let commands = Arc::new(CommandService::new(db.pool.clone(), config));
    let elsewhere = Arc::new(CommandService::new(db.pool.clone(), CommandConfig::default()));
    let starved = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await; // cached here at sequence 2
    let bystander = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    elsewhere.execute_portfolio(&ctx(), starved, deposit("5")).await.unwrap(); // sequence 3

    let mut writer = db.pool.begin().await.unwrap();
    insert_foreign_deposit(&mut writer, bystander, 3, "100", "110", chrono::Utc::now()).await;

    let command = {
        let commands = commands.clone();
        tokio::spawn(async move { commands.execute_portfolio(&ctx(), starved, deposit("1")).await })
    };
    let waiting = eventually(|| async {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_locks
                             where relation = 'events'::regclass and mode = 'ShareRowExclusiveLock' and not granted)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(waiting, "the starved command should wait for the log's table lock");
    assert!(!command.is_finished(), "nothing is written while another writer holds the log");
    writer.commit().await.unwrap();

    let outcome = command.await.unwrap().unwrap();
    assert_eq!(outcome.events[0].sequence, 4, "decided on the other process's deposit");
    let metrics = commands.metrics();
    assert_eq!(metrics.conflicts.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.exclusive_attempts.load(Ordering::Relaxed), 1);
    assert_eq!(cash(&commands, starved).await, dec("16"));
    assert_eq!(cash(&commands, bystander).await, dec("110"));
    db.drop().await;
}
