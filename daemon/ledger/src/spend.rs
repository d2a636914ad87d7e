//! Spend totals for budgets: kept per UTC day by the writer (`spend_days`), read back at start.

use foldhash::{HashMap, HashMapExt};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Transaction};

use crate::packed::View;
use crate::row::text;

/// Milliseconds in a day: `spend_days.day` is `ts_ms / DAY_MS`.
pub const DAY_MS: i64 = 86_400_000;

/// Spend of one (key, backend, model) over some days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendGroup {
    /// Proxy key name.
    pub key: Option<String>,
    /// Backend.
    pub backend: Option<String>,
    /// Upstream model.
    pub model: Option<String>,
    /// Nano-dollars.
    pub cost_nanos: i64,
}

/// Spend per (key, backend, model) of the UTC days in `[from_day, to_day)` (days since
/// 1970-01-01, as `ts_ms / DAY_MS`). A few rows per day and group, whatever the request count.
///
/// Summed here, saturating, rather than by SQL `sum()`, which fails the whole query on an
/// overflow: absurd upstream costs must not stop the daemon from starting. A sum that an
/// earlier version let SQLite turn into a float counts as its saturated integer.
pub fn spend_between(
    conn: &Connection,
    from_day: i64,
    to_day: i64,
) -> rusqlite::Result<Vec<SpendGroup>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, backend, model, cost_nanos FROM spend_days
         WHERE day >= ?1 AND day < ?2 ORDER BY key, backend, model",
    )?;
    let mut rows = stmt.query([from_day, to_day])?;
    let mut groups: Vec<SpendGroup> = Vec::new();
    while let Some(r) = rows.next()? {
        let cost = match r.get_ref(3)? {
            ValueRef::Real(usd_nanos) => usd_nanos as i64,
            _ => r.get(3)?,
        };
        let text = |i: usize| -> rusqlite::Result<Option<String>> {
            let s: String = r.get(i)?;
            Ok((!s.is_empty()).then_some(s))
        };
        let (key, backend, model) = (text(0)?, text(1)?, text(2)?);
        match groups.last_mut() {
            Some(g) if g.key == key && g.backend == backend && g.model == model => {
                g.cost_nanos = g.cost_nanos.saturating_add(cost);
            }
            _ => groups.push(SpendGroup {
                key,
                backend,
                model,
                cost_nanos: cost,
            }),
        }
    }
    Ok(groups)
}

/// Day, key, backend and model of `spend_days`.
type Group<'a> = (i64, &'a [u8], &'a [u8], &'a [u8]);

/// Adds the spend of `rows` to `spend_days` inside the transaction that inserts them, so the
/// totals always equal the rows' sums. One statement per day and group of the batch.
pub(crate) fn add_spend(tx: &Transaction<'_>, rows: &[View<'_>]) -> rusqlite::Result<()> {
    // foldhash, not SipHash: the keys are the daemon's own rows, and hashing them was half of
    // this function's cost per row.
    let mut groups: HashMap<Group<'_>, i64> = HashMap::new();
    for row in rows.iter().filter(|r| r.cost_nanos != 0) {
        let day = row.ts_ms / DAY_MS;
        let key = row.key.unwrap_or_default();
        // What failed attempts' upstreams billed counts for the targets that billed it, the
        // rest for the target that served, as the budgets in memory count them.
        let mut own = row.cost_nanos;
        for (backend, model, cost) in row.billed_failures() {
            let sum = groups.entry((day, key, backend, model)).or_default();
            *sum = sum.saturating_add(cost);
            own = own.saturating_sub(cost);
        }
        let served = (
            day,
            key,
            row.backend.unwrap_or_default(),
            row.model.unwrap_or_default(),
        );
        let sum = groups.entry(served).or_default();
        *sum = sum.saturating_add(own);
    }
    if groups.is_empty() {
        return Ok(());
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO spend_days (day, key, backend, model, cost_nanos) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (day, key, backend, model) DO UPDATE SET cost_nanos =
           CASE WHEN excluded.cost_nanos > 0 AND cost_nanos > ?6 - excluded.cost_nanos THEN ?6
                WHEN excluded.cost_nanos < 0 AND cost_nanos < ?7 - excluded.cost_nanos THEN ?7
                ELSE cost_nanos + excluded.cost_nanos END",
    )?;
    // Saturating like the sums in memory: SQLite would turn an overflowing sum into a float.
    for ((day, key, backend, model), cost) in groups {
        stmt.execute(rusqlite::params![
            day,
            text(key),
            text(backend),
            text(model),
            cost,
            i64::MAX,
            i64::MIN
        ])?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::packed::Packed;
    use crate::row::Row;

    fn ledger() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        conn
    }

    /// [`add_spend`] of `rows`, packed as the writer has them.
    fn add(tx: &Transaction<'_>, rows: &[Row]) {
        let packed: Vec<_> = rows.iter().map(Packed::new).collect();
        let views: Vec<_> = packed.iter().map(|p| p.view().unwrap()).collect();
        add_spend(tx, &views).unwrap();
    }

    fn row(id: &str, ts_ms: i64, key: Option<&str>, cost_nanos: i64) -> Row {
        let mut row = Row::example(id, ts_ms, cost_nanos);
        row.key = key.map(str::to_owned);
        row
    }

    #[test]
    fn spend_is_summed_per_day_and_group_across_batches() {
        let mut conn = ledger();
        let batches = [
            vec![
                row("r1", 10, Some("a"), 5),
                row("r2", 20, Some("a"), 6),
                row("r3", DAY_MS, Some("a"), 7),
                row("r4", DAY_MS + 1, None, 8),
                row("r5", DAY_MS + 2, None, 0),
            ],
            vec![row("r6", DAY_MS + 3, Some("a"), 100)],
        ];
        for batch in &batches {
            let tx = conn.transaction().unwrap();
            add(&tx, batch);
            tx.commit().unwrap();
        }
        let spent = |from, to| {
            let mut groups = spend_between(&conn, from, to).unwrap();
            groups.sort_by(|a, b| a.key.cmp(&b.key));
            groups
                .into_iter()
                .map(|g| (g.key, g.cost_nanos))
                .collect::<Vec<_>>()
        };
        assert_eq!(spent(0, 1), [(Some("a".to_owned()), 11)]);
        assert_eq!(spent(1, 2), [(None, 8), (Some("a".to_owned()), 107)]);
        assert_eq!(
            spent(i64::MIN, i64::MAX),
            [(None, 8), (Some("a".to_owned()), 118)]
        );
        assert!(spent(2, i64::MAX).is_empty());
    }

    #[test]
    fn failed_attempts_billed_count_for_the_target_that_billed_them() {
        let mut conn = ledger();
        let mut served = row("r1", 10, Some("a"), 30);
        served.backend = Some("b1".into());
        served.model = Some("m1".into());
        served.billed_failures = vec![("b2".into(), "m2".into(), 12)];
        let tx = conn.transaction().unwrap();
        add(&tx, &[served]);
        tx.commit().unwrap();
        let groups: Vec<_> = spend_between(&conn, 0, 1)
            .unwrap()
            .into_iter()
            .map(|g| (g.backend, g.model, g.cost_nanos))
            .collect();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            groups,
            [(some("b1"), some("m1"), 18), (some("b2"), some("m2"), 12)]
        );
    }

    #[test]
    fn absurd_costs_saturate_instead_of_wrapping_or_turning_into_floats() {
        let mut conn = ledger();
        for cost in [5, i64::MAX, i64::MAX] {
            let tx = conn.transaction().unwrap();
            add(&tx, &[row("r", 10, None, cost), row("s", 20, None, cost)]);
            tx.commit().unwrap();
        }
        // Another day of the same group: the sum over both days saturates too.
        let tx = conn.transaction().unwrap();
        add(&tx, &[row("t", DAY_MS, None, 7)]);
        tx.commit().unwrap();
        let stored: (String, i64) = conn
            .query_row(
                "SELECT typeof(cost_nanos), cost_nanos FROM spend_days WHERE day = 0",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(stored, ("integer".to_owned(), i64::MAX));
        let groups = spend_between(&conn, i64::MIN, i64::MAX).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].cost_nanos, i64::MAX);
        // A float left by a version that let the sum overflow still reads.
        conn.execute(
            "UPDATE spend_days SET cost_nanos = 1.8446744073709552e19 WHERE day = 0",
            [],
        )
        .unwrap();
        assert_eq!(spend_between(&conn, 0, 1).unwrap()[0].cost_nanos, i64::MAX);
    }
}
