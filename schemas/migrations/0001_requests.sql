-- One row per client request, success or failure (SPEC §9).
-- Times are Unix milliseconds (UTC); durations are microseconds; money is integer
-- nano-dollars (1e-9 USD), so sums are exact.
CREATE TABLE requests (
    id                INTEGER PRIMARY KEY,
    ts_ms             INTEGER NOT NULL,            -- when the request arrived
    request_id        TEXT    NOT NULL,            -- x-orproxy-request-id
    key               TEXT,                        -- proxy key name (never the key)
    client_ip         TEXT,
    backend           TEXT,                        -- backend that served (or was last tried)
    model             TEXT,                        -- upstream model of that route
    model_requested   TEXT,                        -- `model` as the client sent it
    model_served      TEXT,                        -- model the upstream says served
    status            INTEGER NOT NULL,            -- status sent to the client (499: client left)
    outcome           TEXT    NOT NULL,            -- ok | upstream_error | midstream_error | client_disconnected | rejected | budget_exceeded | timeout
    stream            INTEGER NOT NULL,            -- 0 | 1
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cached_tokens     INTEGER,
    reasoning_tokens  INTEGER,
    cost_nanos        INTEGER NOT NULL DEFAULT 0,
    cost_source       TEXT    NOT NULL,            -- upstream | pricing | estimate | none
    latency_us        INTEGER NOT NULL,
    ttfb_us           INTEGER,                     -- until the client could read the answer's first content (a stream's first event that is no keep-alive, else the response head); NULL if nothing else reached it
    upstream_us       INTEGER,                     -- time spent waiting on upstreams
    attempts          TEXT    NOT NULL,            -- JSON: [{"route": "backend:model", "result": "ok" | why}]
    tags              TEXT,                        -- JSON object set by rules
    rules             TEXT,                        -- rules trace: script:field,field;...
    error             TEXT
);
CREATE INDEX requests_ts ON requests (ts_ms);
