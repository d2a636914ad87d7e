-- Spend per UTC day and (key, backend, model), kept by the writer in the same transaction as
-- the rows it sums, so that budgets are rebuilt at start from a few rows per day instead of a
-- scan of every request. `key` is '' for requests without a proxy key (auth off); key names
-- cannot be empty. Deleting old rows from `requests` leaves this spend (and budgets) as it was.
CREATE TABLE spend_days (
    day         INTEGER NOT NULL,                  -- ts_ms / 86400000 (days since 1970-01-01 UTC)
    key         TEXT    NOT NULL,
    backend     TEXT    NOT NULL,
    model       TEXT    NOT NULL,
    cost_nanos  INTEGER NOT NULL,
    PRIMARY KEY (day, key, backend, model)
) WITHOUT ROWID;

INSERT INTO spend_days (day, key, backend, model, cost_nanos)
SELECT ts_ms / 86400000, coalesce(key, ''), coalesce(backend, ''), coalesce(model, ''), sum(cost_nanos)
FROM requests
WHERE cost_nanos != 0
GROUP BY 1, 2, 3, 4;
