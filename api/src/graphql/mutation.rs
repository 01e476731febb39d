//! Mutations: one per command, each with an idempotency key.
//!
//! The key is scoped to the token's subject; the request fingerprint is the mutation's name and the client's
//! input (not the ids and times the server generates), so retrying a request returns its first answer — the
//! same `CommandResult` — and a different request under a used key is refused (`IDEMPOTENCY_KEY_REUSED`).
//! Authorization is checked against the aggregate itself (its owner), never against a read model that may
//! lag behind a portfolio opened a moment ago.

use std::time::Duration;

use async_graphql::{Context, Enum, InputObject, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use ledger::commands::{CommandContext, CommandOutcome, Idempotency};
use ledger::domain::order::{PlaceOrder, RecordExecution};
use ledger::domain::portfolio::AlertCondition;
use ledger::domain::values::{
    AlertId, Amount, ClientOrderId, Currency, ExecId, FreeText, Money, OrderId, Owner, PortfolioId, Price, Quantity,
    Symbol,
};
use ledger::domain::{Order as OrderAggregate, OrderCommand, OrderStatus, OrderType, PortfolioCommand};
use ledger::import::{import, LineError, Statement};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use super::errors::{command, forbidden, invalid, not_found, order_not_found, portfolio_not_found, value};
use super::orders::portfolio_owner;
use super::scalars::LogPosition;
use super::types::{CommandResult, CostBasisMethodGql, OrderStatusGql, OrderTypeGql, SideGql, TimeInForceGql};
use super::{principal, state, AppState, ACCEPTANCE_POLL_MS, ACCEPTANCE_WAIT_MS_MAX};
use crate::auth::{Principal, Role};

/// The context of a mutation: the caller, a fresh correlation, and the idempotency key over `request`.
fn context(ctx: &Context<'_>, principal: &Principal, key: &str, request: &impl Serialize) -> Result<CommandContext> {
    let idempotency = Idempotency::new(key, request).map_err(command)?;
    Ok(super::command_context(ctx, principal).with_idempotency(idempotency))
}

/// Fails unless the caller may trade the portfolio. A role that trades nothing is `FORBIDDEN`; a portfolio the
/// caller may not trade answers exactly like one that does not exist (`PORTFOLIO_NOT_FOUND`), so that ids
/// cannot be probed.
pub(super) async fn authorize_portfolio(state: &AppState, principal: &Principal, portfolio_id: Uuid) -> Result<()> {
    if !principal.can_trade() {
        return Err(forbidden());
    }
    match portfolio_owner(state, portfolio_id).await? {
        Some(owner) if principal.can_trade_portfolio(&owner) => Ok(()),
        _ => Err(portfolio_not_found()),
    }
}

/// Whether the caller may trade `portfolio`, as a batch's `authorize` asks it of the aggregate: a role that trades
/// nothing is `FORBIDDEN`; another owner's portfolio (or none) answers like an unknown one.
fn may_trade(
    principal: &Principal,
    portfolio: &ledger::domain::Portfolio,
) -> Result<(), ledger::commands::CommandError> {
    use ledger::commands::CommandError;
    match &portfolio.terms {
        _ if !principal.can_trade() => {
            Err(CommandError::Refused { code: "FORBIDDEN", message: "not allowed for this token".into() })
        }
        Some(terms) if principal.can_trade_portfolio(terms.owner.as_str()) => Ok(()),
        _ => Err(CommandError::Refused { code: "PORTFOLIO_NOT_FOUND", message: "no such portfolio".into() }),
    }
}

/// Fails unless the caller may trade the order's portfolio: `FORBIDDEN` for a role that trades nothing, and
/// another owner's order answers exactly like an unknown one (`ORDER_NOT_FOUND`).
async fn authorize_order(state: &AppState, principal: &Principal, order_id: Uuid) -> Result<()> {
    if !principal.can_trade() {
        return Err(forbidden());
    }
    let (order, _) =
        state.commands.load::<OrderAggregate>(&order_id.to_string()).await.map_err(super::errors::command)?;
    let Some(terms) = order.terms else { return Err(order_not_found()) };
    match portfolio_owner(state, terms.portfolio_id.0).await? {
        Some(owner) if principal.can_trade_portfolio(&owner) => Ok(()),
        _ => Err(order_not_found()),
    }
}

/// What every mutation on an existing portfolio does: the caller may trade it (see [`authorize_portfolio`]),
/// the request is keyed over `request`, `command` builds the command (its input errors answered as such), the
/// command runs, and a refusal is answered with its code.
async fn on_portfolio(
    ctx: &Context<'_>,
    portfolio_id: Uuid,
    key: &str,
    request: &impl Serialize,
    command: impl FnOnce(&AppState) -> Result<PortfolioCommand>,
) -> Result<CommandOutcome> {
    let (principal, state) = (principal(ctx)?, state(ctx));
    authorize_portfolio(state, principal, portfolio_id).await?;
    let command_ctx = context(ctx, principal, key, request)?;
    let command = command(state)?;
    state.commands.execute_portfolio(&command_ctx, portfolio_id.into(), command).await.map_err(command_error)
}

/// Runs an order command, a refusal answered with its code.
async fn on_order(
    state: &AppState,
    command_ctx: &CommandContext,
    order_id: Uuid,
    command: OrderCommand,
) -> Result<CommandOutcome> {
    state.commands.execute_order(command_ctx, order_id.into(), command).await.map_err(command_error)
}

/// Which way cash moves.
#[derive(Clone, Copy)]
enum CashMove {
    Deposit,
    Withdraw,
}

/// A deposit or a withdrawal of `amount` on the portfolio.
async fn move_cash(
    ctx: &Context<'_>,
    movement: CashMove,
    portfolio_id: Uuid,
    amount: Decimal,
    reference: Option<String>,
    key: &str,
) -> Result<CommandResult> {
    // The request's fingerprint, as it has always been hashed (a key reused with the same input is a repeat).
    let name = match movement {
        CashMove::Deposit => "deposit",
        CashMove::Withdraw => "withdraw",
    };
    let request = (name, portfolio_id, amount, &reference);
    let outcome = on_portfolio(ctx, portfolio_id, key, &request, |state| {
        let reference = free_text("reference", reference.clone())?;
        let (amount, at) = (self::amount(amount)?, state.clock.now());
        Ok(match movement {
            CashMove::Deposit => PortfolioCommand::DepositCash { amount, reference, at },
            CashMove::Withdraw => PortfolioCommand::WithdrawCash { amount, reference, at },
        })
    })
    .await?;
    Ok(outcome.into())
}

/// Optional free text (a reference), bounded and without control characters.
fn free_text(field: &'static str, text: Option<String>) -> Result<Option<FreeText>> {
    text.map(|t| FreeText::new(field, t)).transpose().map_err(value)
}

fn amount(value: Decimal) -> Result<Amount> {
    Amount::new(value).map_err(super::errors::value)
}

#[derive(InputObject, Serialize)]
pub struct OpenPortfolioInput {
    /// ISO 4217 code.
    #[graphql(default = "USD")]
    pub base_currency: String,
    #[graphql(default)]
    #[serde(skip)]
    pub cost_basis_method: CostBasisMethodGql,
    /// Admins only: open it for another owner (default: the token's subject).
    pub owner: Option<String>,
}

#[derive(Default)]
pub struct PortfolioMutation;

#[Object]
impl PortfolioMutation {
    async fn open_portfolio(
        &self,
        ctx: &Context<'_>,
        input: OpenPortfolioInput,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        let principal = principal(ctx)?;
        let state = state(ctx);
        let owner = match (&input.owner, principal.role) {
            (None, Role::Trader | Role::Admin) => principal.subject.clone(),
            (Some(owner), Role::Admin) => owner.clone(),
            (Some(owner), Role::Trader) if *owner == principal.subject => owner.clone(),
            _ => return Err(forbidden()),
        };
        let method_name = format!("{:?}", input.cost_basis_method);
        let ctx_command = context(ctx, principal, &idempotency_key, &("openPortfolio", &input, &method_name))?;
        let portfolio_id = PortfolioId::generate();
        let command = PortfolioCommand::OpenPortfolio {
            portfolio_id,
            owner: Owner::new(owner).map_err(value)?,
            base_currency: Currency::new(input.base_currency).map_err(value)?,
            cost_basis_method: input.cost_basis_method.into(),
            opened_at: state.clock.now(),
        };
        let outcome = state
            .commands
            .execute_portfolio(&ctx_command, portfolio_id, command)
            .await
            .map_err(super::errors::command)?;
        Ok(outcome.into())
    }

    async fn deposit(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        amount: Decimal,
        reference: Option<String>,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        move_cash(ctx, CashMove::Deposit, portfolio_id, amount, reference, &idempotency_key).await
    }

    async fn withdraw(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        amount: Decimal,
        reference: Option<String>,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        move_cash(ctx, CashMove::Withdraw, portfolio_id, amount, reference, &idempotency_key).await
    }

    /// Deposits and withdrawals in bulk (at most 1 000): committed in one transaction, in order, each with the
    /// guarantees of `deposit`/`withdraw` — its own idempotency key, a refusal (`INSUFFICIENT_FUNDS`,
    /// `FORBIDDEN`, `PORTFOLIO_NOT_FOUND`…) leaves no trace and does not stop the others. One answer per
    /// movement, in order. The fast path for imports and high-rate intake (see `ledger-lab bench intake`).
    async fn cash_batch(&self, ctx: &Context<'_>, movements: Vec<CashMovementInput>) -> Result<Vec<BatchItemResult>> {
        use ledger::commands::{BatchItem, CommandError, BATCH_COMMANDS_MAX};
        let principal = principal(ctx)?;
        let state = state(ctx);
        if movements.len() > BATCH_COMMANDS_MAX {
            return Err(invalid(format!("at most {BATCH_COMMANDS_MAX} movements per batch")));
        }
        let now = state.clock.now();
        let mut items = Vec::with_capacity(movements.len());
        let mut early: Vec<Option<BatchItemResult>> = Vec::with_capacity(movements.len());
        for movement in &movements {
            let built = (|| {
                let idempotency = Idempotency::new(&movement.idempotency_key, &("cashBatch", movement))?;
                let amount = Amount::new(movement.amount).map_err(|e| CommandError::Invalid(e.to_string()))?;
                let reference = movement
                    .reference
                    .clone()
                    .map(|r| FreeText::new("reference", r))
                    .transpose()
                    .map_err(|e| CommandError::Invalid(e.to_string()))?;
                let command = match movement.kind {
                    CashMovementKind::Deposit => PortfolioCommand::DepositCash { amount, reference, at: now },
                    CashMovementKind::Withdraw => PortfolioCommand::WithdrawCash { amount, reference, at: now },
                };
                Ok::<_, CommandError>(BatchItem {
                    aggregate_id: movement.portfolio_id.to_string(),
                    command,
                    idempotency: Some(idempotency),
                    cause: None,
                })
            })();
            match built {
                Ok(item) => {
                    items.push(item);
                    early.push(None);
                }
                Err(error) => early.push(Some(batch_answer(Err(error)))),
            }
        }
        // As for single commands: a role that trades nothing is FORBIDDEN; another owner's portfolio answers
        // like an unknown one.
        let authorize = |portfolio: &ledger::domain::Portfolio| may_trade(principal, portfolio);
        let command_ctx = super::command_context(ctx, principal);
        let mut answers = state
            .commands
            .execute_batch::<ledger::domain::Portfolio>(&command_ctx, items, authorize)
            .await
            .map_err(super::errors::command)?
            .into_iter()
            .map(batch_answer);
        Ok(early.into_iter().map(|e| e.unwrap_or_else(|| answers.next().expect("one answer per item"))).collect())
    }

    /// Imports a broker's statement into a portfolio, as `ledger import` does (see README "Statement import"):
    /// `csv` holds trade rows `date,symbol,side,quantity,price,fee` and cash rows `date,type,amount` (at most
    /// the request size, 256 KiB). Each row is booked once however often the statement is imported, by anyone
    /// (its key derives from the portfolio and the row); a line that cannot be read or that the portfolio
    /// refuses is listed in `errors` and applies nothing, every other line is applied. Rows are applied in date
    /// order. No idempotency key: the rows carry their own.
    async fn import_statement(&self, ctx: &Context<'_>, portfolio_id: Uuid, csv: String) -> Result<ImportResult> {
        let principal = principal(ctx)?;
        let state = state(ctx);
        let statement = Statement::parse(&csv, state.clock.now()).map_err(command)?;
        // As in `cashBatch`, checked against the aggregate: before the first row, then at every batch.
        let authorize = |portfolio: &ledger::domain::Portfolio| may_trade(principal, portfolio);
        let requested = super::command_context(ctx, principal);
        let report = import(&state.commands, &requested, PortfolioId(portfolio_id), statement, authorize, |_, _| {})
            .await
            .map_err(command)?;
        Ok(ImportResult {
            rows: report.rows,
            applied: report.applied,
            already_imported: report.already_imported,
            errors: report.errors,
            last_position: report.last_position.map(LogPosition),
        })
    }
}

/// What `importStatement` did.
#[derive(SimpleObject)]
pub struct ImportResult {
    /// Data lines, readable or not (headers, comments and blank lines not counted): `applied +
    /// alreadyImported + errors`.
    pub rows: usize,
    /// Rows booked by this import.
    pub applied: usize,
    /// Rows an earlier import had already booked (nothing written for them).
    pub already_imported: usize,
    /// Lines not applied (nothing of them was), in line order.
    pub errors: Vec<LineError>,
    /// Position of the last event this import wrote: pass it as `waitFor` to read the imported state.
    pub last_position: Option<LogPosition>,
}

/// A cash movement of a batch.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Serialize, Debug)]
pub enum CashMovementKind {
    Deposit,
    Withdraw,
}

#[derive(InputObject, Serialize)]
pub struct CashMovementInput {
    pub portfolio_id: Uuid,
    pub kind: CashMovementKind,
    pub amount: Decimal,
    pub reference: Option<String>,
    /// Per movement, as for `deposit` and `withdraw`: a repeated movement returns its first answer.
    pub idempotency_key: String,
}

/// A refusal of one command of a batch (`code` as in a mutation error's `extensions.code`).
#[derive(SimpleObject)]
pub struct CommandFailure {
    pub code: String,
    pub message: String,
}

/// The answer for one command of a batch: exactly one of `result` and `error`.
#[derive(SimpleObject)]
pub struct BatchItemResult {
    pub result: Option<CommandResult>,
    pub error: Option<CommandFailure>,
}

fn batch_answer(result: Result<CommandOutcome, ledger::commands::CommandError>) -> BatchItemResult {
    match result {
        Ok(outcome) => BatchItemResult { result: Some(outcome.into()), error: None },
        Err(error) => {
            let message = if error.is_business() {
                error.to_string()
            } else if matches!(error, ledger::commands::CommandError::Contention { .. }) {
                "the target changed concurrently too often; retry".to_string()
            } else {
                tracing::error!(%error, "a batched command failed");
                "internal error".to_string()
            };
            BatchItemResult { result: None, error: Some(CommandFailure { code: error.code().to_string(), message }) }
        }
    }
}

#[derive(InputObject, Serialize)]
pub struct PlaceOrderInput {
    pub portfolio_id: Uuid,
    pub symbol: String,
    #[serde(skip)]
    pub side: SideGql,
    #[graphql(name = "type")]
    #[serde(skip)]
    pub order_type: OrderTypeGql,
    pub quantity: Decimal,
    /// Required for limit and stop-limit orders, refused for the others.
    pub limit_price: Option<Decimal>,
    /// Required for stop and stop-limit orders (the price that triggers them), refused for the others.
    pub stop_price: Option<Decimal>,
    #[graphql(default_with = "TimeInForceGql::Day")]
    #[serde(skip)]
    pub time_in_force: TimeInForceGql,
    /// Your own reference (FIX ClOrdID); default: the idempotency key.
    pub client_order_id: Option<String>,
}

#[derive(SimpleObject)]
pub struct PlaceOrderPayload {
    pub result: CommandResult,
    pub order_id: Uuid,
    /// With `waitForAcceptanceMs`: the status reached within the wait (`PENDING_NEW` if still undecided).
    pub status: Option<OrderStatusGql>,
}

#[derive(InputObject, Serialize)]
pub struct RecordExecutionInput {
    pub order_id: Uuid,
    /// Unique per order: a repeated report with the same id is refused (`DUPLICATE_EXEC_ID`).
    pub exec_id: String,
    pub quantity: Decimal,
    pub price: Decimal,
    #[graphql(default)]
    pub fee: Decimal,
    /// Default: now.
    pub executed_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct OrderMutation;

#[Object]
impl OrderMutation {
    /// Places an order. The process manager then reserves funds (or units) and accepts or rejects it; pass
    /// `waitForAcceptanceMs` (at most 10 000) to wait for that decision.
    async fn place_order(
        &self,
        ctx: &Context<'_>,
        input: PlaceOrderInput,
        idempotency_key: String,
        wait_for_acceptance_ms: Option<i32>,
    ) -> Result<PlaceOrderPayload> {
        let principal = principal(ctx)?;
        let state = state(ctx);
        authorize_portfolio(state, principal, input.portfolio_id).await?;
        let described =
            (format!("{:?}", input.side), format!("{:?}", input.order_type), format!("{:?}", input.time_in_force));
        let ctx_command = context(ctx, principal, &idempotency_key, &("placeOrder", &input, &described))?;
        let price = |amount: Option<Decimal>| amount.map(Price::new).transpose().map_err(value);
        let (limit, stop) = (price(input.limit_price)?, price(input.stop_price)?);
        let order_type = match (input.order_type, limit, stop) {
            (OrderTypeGql::Market, None, None) => OrderType::Market,
            (OrderTypeGql::Limit, Some(limit_price), None) => OrderType::Limit { limit_price },
            (OrderTypeGql::Stop, None, Some(stop_price)) => OrderType::Stop { stop_price },
            (OrderTypeGql::StopLimit, Some(limit_price), Some(stop_price)) => {
                OrderType::StopLimit { stop_price, limit_price }
            }
            (order_type, ..) => {
                return Err(invalid(format!(
                    "{order_type:?} orders take {}",
                    match order_type {
                        OrderTypeGql::Market => "neither limitPrice nor stopPrice",
                        OrderTypeGql::Limit => "limitPrice and no stopPrice",
                        OrderTypeGql::Stop => "stopPrice and no limitPrice",
                        OrderTypeGql::StopLimit => "both stopPrice and limitPrice",
                    }
                )))
            }
        };
        let order_id = OrderId::generate();
        let client_order_id =
            input.client_order_id.clone().unwrap_or_else(|| idempotency_key.chars().take(64).collect());
        let command = OrderCommand::PlaceOrder(PlaceOrder {
            order_id,
            portfolio_id: PortfolioId(input.portfolio_id),
            client_order_id: ClientOrderId::new(client_order_id).map_err(value)?,
            symbol: Symbol::new(input.symbol.clone()).map_err(value)?,
            side: input.side.into(),
            order_type,
            quantity: Quantity::new(input.quantity).map_err(value)?,
            time_in_force: input.time_in_force.into(),
            placed_at: state.clock.now(),
        });
        let outcome = on_order(state, &ctx_command, order_id.0, command).await?;
        let order_id = Uuid::parse_str(&outcome.aggregate_id).map_err(super::errors::internal)?;
        let status = match wait_for_acceptance_ms {
            Some(ms) => Some(wait_for_decision(state, order_id, ms.max(0) as u64).await?),
            None => None,
        };
        Ok(PlaceOrderPayload { result: outcome.into(), order_id, status })
    }

    async fn cancel_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        reason: Option<String>,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        let (principal, state) = (principal(ctx)?, state(ctx));
        authorize_order(state, principal, order_id).await?;
        let ctx_command = context(ctx, principal, &idempotency_key, &("cancelOrder", order_id, &reason))?;
        let reason = FreeText::new("reason", reason.unwrap_or_else(|| "client".into())).map_err(value)?;
        let command = OrderCommand::CancelOrder { reason, canceled_at: state.clock.now() };
        let outcome = on_order(state, &ctx_command, order_id, command).await?;
        Ok(outcome.into())
    }

    /// Amends an open order (FIX OrderCancelReplaceRequest): a new total `quantity` (above what is filled:
    /// `AMEND_BELOW_FILLED` otherwise), a new `limitPrice` (limit and stop-limit orders) and/or `stopPrice` (stop
    /// and stop-limit orders not triggered yet). The request is recorded at once (`OrderAmendRequested`); the
    /// process manager then adjusts the reservation and the order takes the new terms (`OrderAmended`, a new
    /// version in its history), or the amendment is turned down (`OrderAmendRejected`, e.g. when the portfolio
    /// cannot cover a larger order) and the order keeps its terms. Pass the answer's `lastPosition` as `waitFor`
    /// to `order` to read the outcome. Refused for a done order (`ORDER_TERMINAL`), one not accepted yet, or
    /// while another amendment is pending (`AMEND_PENDING`).
    async fn amend_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
        quantity: Option<Decimal>,
        limit_price: Option<Decimal>,
        stop_price: Option<Decimal>,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        let (principal, state) = (principal(ctx)?, state(ctx));
        authorize_order(state, principal, order_id).await?;
        let request = ("amendOrder", order_id, quantity, limit_price, stop_price);
        let ctx_command = context(ctx, principal, &idempotency_key, &request)?;
        let command = OrderCommand::AmendOrder {
            quantity: quantity.map(Quantity::new).transpose().map_err(value)?,
            limit_price: limit_price.map(Price::new).transpose().map_err(value)?,
            stop_price: stop_price.map(Price::new).transpose().map_err(value)?,
            requested_at: state.clock.now(),
        };
        let outcome = on_order(state, &ctx_command, order_id, command).await?;
        Ok(outcome.into())
    }

    /// Records one fill reported by the executing venue. Brokers and admins only.
    async fn record_execution(
        &self,
        ctx: &Context<'_>,
        input: RecordExecutionInput,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        let principal = principal(ctx)?;
        if !principal.can_record_executions() {
            return Err(forbidden());
        }
        let state = state(ctx);
        let ctx_command = context(ctx, principal, &idempotency_key, &("recordExecution", &input))?;
        let command = OrderCommand::RecordExecution(RecordExecution {
            exec_id: ExecId::new(input.exec_id).map_err(value)?,
            quantity: Quantity::new(input.quantity).map_err(value)?,
            price: Price::new(input.price).map_err(value)?,
            fee: Money::new(input.fee).map_err(value)?,
            executed_at: input.executed_at.unwrap_or_else(|| state.clock.now()),
        });
        let outcome = on_order(state, &ctx_command, input.order_id, command).await?;
        Ok(outcome.into())
    }
}

/// Polls the order until the process manager decided it, or `wait_ms` passed.
async fn wait_for_decision(state: &AppState, order_id: Uuid, wait_ms: u64) -> Result<OrderStatusGql> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms.min(ACCEPTANCE_WAIT_MS_MAX));
    loop {
        let (order, _) =
            state.commands.load::<OrderAggregate>(&order_id.to_string()).await.map_err(super::errors::command)?;
        if order.status != OrderStatus::PendingNew || tokio::time::Instant::now() >= deadline {
            return Ok(order.status.into());
        }
        tokio::time::sleep(Duration::from_millis(ACCEPTANCE_POLL_MS)).await;
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AlertKind {
    PriceAbove,
    PriceBelow,
    CrossingUp,
    CrossingDown,
    PercentChange,
    PositionPnlAbove,
    PositionPnlBelow,
}

/// An alert condition. Which fields are needed depends on `kind`: `level` for price above/below and
/// crossings; `reference` and `percent` for % change; `threshold` for position P&L.
#[derive(InputObject, Serialize)]
pub struct AlertConditionInput {
    pub kind: AlertKind,
    pub symbol: String,
    pub level: Option<Decimal>,
    pub reference: Option<Decimal>,
    pub percent: Option<Decimal>,
    pub threshold: Option<Decimal>,
}

impl AlertConditionInput {
    fn condition(&self) -> Result<AlertCondition> {
        let symbol = Symbol::new(self.symbol.clone()).map_err(value)?;
        let need =
            |field: Option<Decimal>, name: &str| field.ok_or_else(|| invalid(format!("{:?} needs {name}", self.kind)));
        let price = |field: Option<Decimal>, name: &str| need(field, name).and_then(|v| Price::new(v).map_err(value));
        Ok(match self.kind {
            AlertKind::PriceAbove => AlertCondition::PriceAbove { symbol, level: price(self.level, "level")? },
            AlertKind::PriceBelow => AlertCondition::PriceBelow { symbol, level: price(self.level, "level")? },
            AlertKind::CrossingUp => AlertCondition::CrossingUp { symbol, level: price(self.level, "level")? },
            AlertKind::CrossingDown => AlertCondition::CrossingDown { symbol, level: price(self.level, "level")? },
            AlertKind::PercentChange => AlertCondition::PercentChange {
                symbol,
                reference: price(self.reference, "reference")?,
                percent: need(self.percent, "percent")?,
            },
            AlertKind::PositionPnlAbove => {
                AlertCondition::PositionPnlAbove { symbol, threshold: need(self.threshold, "threshold")? }
            }
            AlertKind::PositionPnlBelow => {
                AlertCondition::PositionPnlBelow { symbol, threshold: need(self.threshold, "threshold")? }
            }
        })
    }
}

#[derive(SimpleObject)]
pub struct CreateAlertPayload {
    pub result: CommandResult,
    pub alert_id: Uuid,
}

#[derive(Default)]
pub struct AlertMutation;

#[Object]
impl AlertMutation {
    async fn create_alert(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        condition: AlertConditionInput,
        idempotency_key: String,
    ) -> Result<CreateAlertPayload> {
        let request = ("createAlert", portfolio_id, &condition);
        let outcome = on_portfolio(ctx, portfolio_id, &idempotency_key, &request, |state| {
            Ok(PortfolioCommand::CreateAlert {
                alert_id: AlertId::generate(),
                condition: condition.condition()?,
                at: state.clock.now(),
            })
        })
        .await?;
        let state = state(ctx);
        // The alert's id is in the event (the same for a repeated request, whose answer is the first one's).
        let event_id = outcome.events.first().map(|e| e.event_id).ok_or_else(|| not_found("alert event"))?;
        let event = ledger::log::event_by_id(&state.pool, event_id).await.map_err(super::errors::database)?;
        let event = event.ok_or_else(|| not_found("alert event"))?;
        let alert_id = event.payload["AlertCreated"]["alert_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| not_found("alert id"))?;
        Ok(CreateAlertPayload { result: outcome.into(), alert_id })
    }

    async fn cancel_alert(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        alert_id: Uuid,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        alert_command(ctx, portfolio_id, alert_id, idempotency_key, "cancelAlert").await
    }

    /// Arms an alert again so that it can fire once more.
    async fn rearm_alert(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        alert_id: Uuid,
        idempotency_key: String,
    ) -> Result<CommandResult> {
        alert_command(ctx, portfolio_id, alert_id, idempotency_key, "rearmAlert").await
    }
}

async fn alert_command(
    ctx: &Context<'_>,
    portfolio_id: Uuid,
    alert_id: Uuid,
    key: String,
    name: &str,
) -> Result<CommandResult> {
    let outcome = on_portfolio(ctx, portfolio_id, &key, &(name, portfolio_id, alert_id), |state| {
        let (alert_id, at) = (AlertId(alert_id), state.clock.now());
        Ok(match name {
            "cancelAlert" => PortfolioCommand::CancelAlert { alert_id, at },
            _ => PortfolioCommand::RearmAlert { alert_id, at },
        })
    })
    .await?;
    Ok(outcome.into())
}

fn command_error(error: ledger::commands::CommandError) -> async_graphql::Error {
    command(error)
}
