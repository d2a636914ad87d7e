-- The prices of input written to the prompt cache, when a model list publishes them
-- (OpenRouter's `input_cache_write` and `input_cache_write_1h`; Anthropic's models charge 1.25x
-- input for a five-minute write, 2x for an hour). NULL: the input price (for an hour's write,
-- the write price first).
ALTER TABLE prices ADD COLUMN cache_write_per_mtok INTEGER;
ALTER TABLE prices ADD COLUMN cache_write_1h_per_mtok INTEGER;
-- Lists stored before had no such prices: fetch them again at the next start (the stored
-- prices still serve until then, and if the fetch fails).
UPDATE prices SET fetched_ms = 0;
