-- Model prices fetched from an upstream's model list, kept so that a restart without network
-- still prices requests. Prices are nano-dollars per million tokens (exact for any price
-- OpenRouter publishes per token).
CREATE TABLE prices (
    backend                 TEXT    NOT NULL,
    model                   TEXT    NOT NULL,
    prompt_per_mtok         INTEGER NOT NULL,
    completion_per_mtok     INTEGER NOT NULL,
    cached_prompt_per_mtok  INTEGER,
    request_nanos           INTEGER NOT NULL DEFAULT 0,
    max_output_tokens       INTEGER,
    fetched_ms              INTEGER NOT NULL,
    PRIMARY KEY (backend, model)
) WITHOUT ROWID;
