//! The executions counter's arithmetic: refills, limit changes and resets, as pure
//! functions of the stored counter and the time.
//!
//! Backends apply them inside the one transaction that reads and writes the
//! counter (taking an execution included), so a refill is atomic with respect to
//! consumption: never lost to a concurrent run, never applied twice (the schedule
//! moves in the same write as the executions it adds), durable once committed.
//! Views apply [`refilled`] to their copy, so a key object shows what the next run
//! will find, without writing anything.
//!
//! The refill rule (`executionsRefill: {"amount", "intervalSec"}`): every
//! `intervalSec` seconds, `amount` executions are added to what remains, never
//! beyond the limit. Refills fall at fixed times, the moment the refill was set
//! plus whole multiples of the interval, however the key is used. Intervals that
//! passed unseen (the server was down, nobody used the key) are all caught up,
//! with the same cap: after three missed daily refills of 100 under a limit of
//! 1000, 300 more remain (1000 at most). Nothing is banked beyond the limit: an
//! interval that ends with the counter full adds nothing.

use crate::model::{QuotaRecord, Refill, Timestamp};
use crate::store::QuotaChange;

/// The counter at `now`, with every refill due by then applied.
pub fn refilled(q: QuotaRecord, now: Timestamp) -> QuotaRecord {
    let (Some(refill), Some(anchor), Some(limit), Some(remaining)) =
        (q.refill, q.refilled_at, q.limit, q.remaining)
    else {
        return q;
    };
    let interval_ms = interval_ms(refill);
    let elapsed = i128::from(now.millis()) - i128::from(anchor.millis());
    if interval_ms == 0 || elapsed < interval_ms {
        return q;
    }
    let due = elapsed / interval_ms;
    let remaining = if remaining < limit {
        let added = due.saturating_mul(i128::from(refill.amount));
        (i128::from(remaining).saturating_add(added)).min(i128::from(limit)) as u64
    } else {
        remaining
    };
    let anchor = i128::from(anchor.millis()) + due * interval_ms;
    QuotaRecord {
        remaining: Some(remaining),
        refilled_at: Some(Timestamp::from_millis(
            anchor.clamp(0, i128::from(i64::MAX)) as i64,
        )),
        ..q
    }
}

/// When the next refill falls, for a counter already [`refilled`] to now.
pub fn next_refill_at(q: &QuotaRecord) -> Option<Timestamp> {
    let (refill, anchor) = (q.refill?, q.refilled_at?);
    q.limit?;
    let next = i128::from(anchor.millis()) + interval_ms(refill);
    Some(Timestamp::from_millis(next.min(i128::from(i64::MAX)) as i64))
}

/// Whether `a` is the same or a later state than `b` of one counter that only runs
/// changed: along runs the schedule only moves forward and, within one interval,
/// what remains only goes down. Under other settings (a limit or refill changed
/// in between), no: settings reach caches by their own path.
pub fn is_later_use(a: &QuotaRecord, b: &QuotaRecord) -> bool {
    a.limit == b.limit
        && a.refill == b.refill
        && (a.refilled_at, std::cmp::Reverse(a.remaining))
            >= (b.refilled_at, std::cmp::Reverse(b.remaining))
}

fn interval_ms(refill: Refill) -> i128 {
    i128::from(refill.interval_sec) * 1000
}

/// Applies `change` at `now`, after the refills due by then.
pub fn apply_change(old: QuotaRecord, change: QuotaChange, now: Timestamp) -> QuotaRecord {
    let old = refilled(old, now);
    match change {
        // Unlimited: nothing to count, nothing to refill.
        QuotaChange::SetLimit(None) => QuotaRecord::new(None),
        QuotaChange::SetLimit(Some(limit)) => {
            let remaining = match (old.limit, old.remaining) {
                (Some(old_limit), Some(rem)) => {
                    (rem as i128 + limit as i128 - old_limit as i128).clamp(0, limit as i128) as u64
                }
                _ => limit,
            };
            QuotaRecord {
                limit: Some(limit),
                remaining: Some(remaining),
                ..old
            }
        }
        QuotaChange::Reset(remaining) => QuotaRecord {
            remaining: remaining.or(old.limit),
            ..old
        },
        // The same refill again changes nothing (its schedule stays); a new one
        // starts its first interval now.
        QuotaChange::SetRefill(Some(refill)) if old.refill == Some(refill) => old,
        QuotaChange::SetRefill(Some(refill)) if old.limit.is_some() => QuotaRecord {
            refill: Some(refill),
            refilled_at: Some(now),
            ..old
        },
        QuotaChange::SetRefill(_) => QuotaRecord {
            refill: None,
            refilled_at: None,
            ..old
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn at(secs: f64) -> Timestamp {
        Timestamp::from_millis(T0 + (secs * 1000.0) as i64)
    }

    fn q(limit: Option<u64>, remaining: Option<u64>) -> QuotaRecord {
        QuotaRecord {
            limit,
            remaining,
            refill: None,
            refilled_at: None,
        }
    }

    fn refilling(limit: u64, remaining: u64, amount: u64, interval_sec: u64) -> QuotaRecord {
        QuotaRecord {
            refill: Some(Refill {
                amount,
                interval_sec,
            }),
            refilled_at: Some(at(0.0)),
            ..q(Some(limit), Some(remaining))
        }
    }

    #[test]
    fn each_whole_interval_adds_the_amount_up_to_the_limit() {
        let start = refilling(100, 10, 7, 60);
        assert_eq!(refilled(start, at(59.999)), start, "not yet");
        let one = refilled(start, at(60.0));
        assert_eq!(one.remaining, Some(17));
        assert_eq!(one.refilled_at, Some(at(60.0)));
        assert_eq!(next_refill_at(&one), Some(at(120.0)));
        // Three intervals missed at once: all caught up, the schedule kept.
        let three = refilled(start, at(200.0));
        assert_eq!(three.remaining, Some(31));
        assert_eq!(three.refilled_at, Some(at(180.0)));
        // Applying it again at the same time adds nothing: no double refill.
        assert_eq!(refilled(three, at(200.0)), three);
        // Capped at the limit, however long it was.
        let year = refilled(start, at(365.0 * 86_400.0));
        assert_eq!(year.remaining, Some(100));
        // Time going backwards adds nothing.
        assert_eq!(refilled(one, at(30.0)), one);
    }

    #[test]
    fn a_full_counter_banks_nothing_and_above_the_limit_is_kept() {
        let full = refilling(5, 5, 2, 1);
        let later = refilled(full, at(10.5));
        assert_eq!(later.remaining, Some(5));
        assert_eq!(later.refilled_at, Some(at(10.0)));
        // A reset above the limit is not cut by a refill.
        let above = refilling(5, 9, 2, 1);
        assert_eq!(refilled(above, at(3.0)).remaining, Some(9));
        // Without a limit or a refill, nothing happens.
        assert_eq!(refilled(q(None, None), at(10.0)), q(None, None));
        assert_eq!(next_refill_at(&q(Some(3), Some(3))), None);
    }

    #[test]
    fn changes_apply_after_the_refills_due() {
        let start = refilling(100, 10, 5, 10);
        // A reset at 25 s: the two refills due are applied first, so the reset's
        // value is what remains, and the next refill is at 30 s.
        let reset = apply_change(start, QuotaChange::Reset(Some(0)), at(25.0));
        assert_eq!(reset.remaining, Some(0));
        assert_eq!(next_refill_at(&reset), Some(at(30.0)));
        // The same refill again keeps its schedule; another one starts now.
        let same = apply_change(reset, QuotaChange::SetRefill(start.refill), at(26.0));
        assert_eq!(same, reset);
        let new = Refill {
            amount: 1,
            interval_sec: 2,
        };
        let changed = apply_change(reset, QuotaChange::SetRefill(Some(new)), at(26.0));
        assert_eq!(changed.refill, Some(new));
        assert_eq!(next_refill_at(&changed), Some(at(28.0)));
        // Unlimited drops the refill; a refill without a limit is none.
        assert_eq!(
            apply_change(changed, QuotaChange::SetLimit(None), at(27.0)),
            q(None, None)
        );
        assert_eq!(
            apply_change(q(None, None), QuotaChange::SetRefill(Some(new)), at(27.0)),
            q(None, None)
        );
        assert_eq!(
            apply_change(changed, QuotaChange::SetRefill(None), at(27.0)).refill,
            None
        );
    }

    #[test]
    fn later_uses_are_told_apart_from_earlier_ones() {
        let start = refilling(100, 10, 5, 10);
        let one_run = QuotaRecord {
            remaining: Some(9),
            ..start
        };
        assert!(is_later_use(&one_run, &start));
        assert!(!is_later_use(&start, &one_run));
        assert!(is_later_use(&start, &start));
        // A refill and a run: later, though more remains.
        let refilled_run = QuotaRecord {
            remaining: Some(13),
            refilled_at: Some(at(10.0)),
            ..one_run
        };
        assert!(is_later_use(&refilled_run, &one_run));
        assert!(!is_later_use(&one_run, &refilled_run));
        // Other settings: not comparable.
        let other_limit = QuotaRecord {
            limit: Some(50),
            ..start
        };
        assert!(!is_later_use(&other_limit, &start));
        assert!(is_later_use(&q(Some(3), Some(1)), &q(Some(3), Some(2))));
    }

    #[test]
    fn limit_changes_move_remaining_by_the_difference() {
        let used_3_of_10 = q(Some(10), Some(7));
        let now = at(0.0);
        assert_eq!(
            apply_change(used_3_of_10, QuotaChange::SetLimit(Some(20)), now),
            q(Some(20), Some(17))
        );
        assert_eq!(
            apply_change(used_3_of_10, QuotaChange::SetLimit(Some(2)), now),
            q(Some(2), Some(0))
        );
        assert_eq!(
            apply_change(q(None, None), QuotaChange::SetLimit(Some(5)), now),
            q(Some(5), Some(5))
        );
        assert_eq!(
            apply_change(used_3_of_10, QuotaChange::Reset(None), now),
            q(Some(10), Some(10))
        );
        assert_eq!(
            apply_change(used_3_of_10, QuotaChange::Reset(Some(1)), now),
            q(Some(10), Some(1))
        );
    }
}
