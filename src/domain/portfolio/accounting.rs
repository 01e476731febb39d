//! The arithmetic of a fill, as pure functions: what a buy costs, which lots a sell consumes, the cost basis
//! removed and the realized P&L under FIFO or average cost.
//!
//! Rounding: money is kept to 8 decimals (banker's rounding). Wherever a proportional share is taken (part of
//! a lot, part of an average-cost basis, part of a reservation), taking the *whole* remainder uses the exact
//! remaining amount instead of a rounded share, so rounding residue never outlives a position or reservation.

use std::collections::VecDeque;

use rust_decimal::{Decimal, RoundingStrategy};

use super::{CostBasisMethod, Lot, LotConsumed, Position};

/// Decimal places kept for money inside the ledger.
pub const MONEY_SCALE: u32 = 8;

pub fn round_money(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(MONEY_SCALE, RoundingStrategy::MidpointNearestEven).normalize()
}

/// `total × part / whole`, or exactly `total` when `part == whole`.
pub fn proportional_share(total: Decimal, part: Decimal, whole: Decimal) -> Decimal {
    if part >= whole {
        total
    } else {
        round_money(total * part / whole)
    }
}

/// The lots a sell of `quantity` consumes, oldest first, each at its FIFO cost.
/// The caller has checked that the lots hold at least `quantity`.
pub fn consume_fifo(lots: &VecDeque<Lot>, quantity: Decimal) -> Vec<LotConsumed> {
    let mut remaining = quantity;
    let mut consumed = Vec::new();
    for lot in lots {
        if remaining.is_zero() {
            break;
        }
        let take = remaining.min(lot.quantity);
        consumed.push(LotConsumed {
            lot_id: lot.lot_id.clone(),
            quantity: take,
            cost: proportional_share(lot.cost, take, lot.quantity),
        });
        remaining -= take;
    }
    consumed
}

/// Applies a consumption computed by [`consume_fifo`] to the lots (used by `apply`).
pub fn apply_consumption(lots: &mut VecDeque<Lot>, consumed: &[LotConsumed]) {
    for part in consumed {
        if let Some(index) = lots.iter().position(|l| l.lot_id == part.lot_id) {
            let lot = &mut lots[index];
            lot.quantity -= part.quantity;
            lot.cost -= part.cost;
            if lot.quantity.is_zero() {
                lots.remove(index);
            }
        }
    }
}

/// The cost basis removed from `position` when `quantity` units are sold.
pub fn cost_basis_removed(
    method: CostBasisMethod,
    position: &Position,
    quantity: Decimal,
    consumed: &[LotConsumed],
) -> Decimal {
    match method {
        CostBasisMethod::Fifo => consumed.iter().map(|c| c.cost).sum(),
        CostBasisMethod::AverageCost => proportional_share(position.cost_basis, quantity, position.quantity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use rust_decimal_macros::dec;

    fn lot(id: &str, quantity: Decimal, cost: Decimal) -> Lot {
        Lot { lot_id: id.into(), quantity, cost, acquired_at: Utc::now() }
    }

    #[test]
    fn fifo_takes_oldest_lots_first_and_splits_the_last() {
        let lots: VecDeque<_> = [lot("a", dec!(10), dec!(100)), lot("b", dec!(10), dec!(200))].into();
        let consumed = consume_fifo(&lots, dec!(15));
        assert_eq!(
            consumed,
            vec![
                LotConsumed { lot_id: "a".into(), quantity: dec!(10), cost: dec!(100) },
                LotConsumed { lot_id: "b".into(), quantity: dec!(5), cost: dec!(100) },
            ]
        );
        let mut after = lots.clone();
        apply_consumption(&mut after, &consumed);
        assert_eq!(after.len(), 1);
        assert_eq!((after[0].quantity, after[0].cost), (dec!(5), dec!(100)));
    }

    #[test]
    fn whole_remainders_are_exact() {
        // 100 / 3 does not divide; selling the three thirds must remove exactly 100.
        let mut lots: VecDeque<_> = [lot("a", dec!(3), dec!(100))].into();
        let mut removed = Decimal::ZERO;
        for _ in 0..3 {
            let c = consume_fifo(&lots, dec!(1));
            removed += c[0].cost;
            apply_consumption(&mut lots, &c);
        }
        assert_eq!(removed, dec!(100));
        assert!(lots.is_empty());
    }
}
