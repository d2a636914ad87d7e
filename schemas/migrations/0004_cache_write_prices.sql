-- The price of input written to the prompt cache, when a model list publishes one (OpenRouter's
-- `input_cache_write`; Anthropic's models charge 1.25x input for it). NULL: the input price.
ALTER TABLE prices ADD COLUMN cache_write_per_mtok INTEGER;
-- Lists stored before had no such price: fetch them again at the next start (the stored prices
-- still serve until then, and if the fetch fails).
UPDATE prices SET fetched_ms = 0;
