//! Prices and costs: what a request cost when the upstream did not say, and what it may cost
//! at worst (for budget reservations).
//!
//! A route's price comes from the model list its backend publishes (fetched, kept in the
//! database, refreshed daily and on `POST /admin/prices/refresh`), else from `pricing:` in the
//! config. All money is integer nano-dollars; prices are nano-dollars per million tokens, so
//! even sub-nano-dollar per-token prices are exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use orproxy_plugin::{Nanos, Price, Usage};
use regex::Regex;
use serde::Serialize;

use crate::config::{Diagnostic, PricingConfig, Sourced};
use serde_saphyr::Spanned;

/// Answer length assumed for a reservation when neither the request nor the price says.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// One `pricing:` entry, compiled.
#[derive(Debug, Clone)]
pub struct PriceRule {
    /// Matched anywhere in `backend:model`.
    pub regex: Regex,
    /// The price.
    pub price: Price,
    /// The model's largest answer, if given.
    pub max_output_tokens: Option<u64>,
}

/// Compiles `pricing:`; bad patterns become diagnostics.
pub fn build_rules(
    config: Option<&Sourced<Vec<Spanned<PricingConfig>>>>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<PriceRule> {
    let Some(list) = config else {
        return Vec::new();
    };
    list.value
        .iter()
        .filter_map(|entry| {
            let p = &entry.value;
            match Regex::new(&p.pattern) {
                Ok(regex) => Some(PriceRule {
                    regex,
                    price: Price {
                        prompt_per_mtok: p.input_usd_per_mtok.0,
                        completion_per_mtok: p.output_usd_per_mtok.0,
                        cached_prompt_per_mtok: p.cached_input_usd_per_mtok.map(|u| u.0),
                        cache_write_prompt_per_mtok: p.cache_write_usd_per_mtok.map(|u| u.0),
                        cache_write_1h_prompt_per_mtok: p.cache_write_1h_usd_per_mtok.map(|u| u.0),
                        request: p.request_usd.map_or(0, |u| u.0),
                    },
                    max_output_tokens: p.max_output_tokens,
                }),
                Err(e) => {
                    errors.push(list.error_at(
                        entry.referenced,
                        format!(
                            "pricing.match: invalid regex `{}`: {}",
                            p.pattern,
                            crate::config::one_line(&e.to_string())
                        ),
                    ));
                    None
                }
            }
        })
        .collect()
}

/// Where a price was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PriceOrigin {
    /// The backend's published model list.
    List,
    /// `pricing:` in the config.
    Config,
}

/// A price and what else is known about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// The price.
    pub price: Price,
    /// The model's largest answer, when known.
    pub max_output_tokens: Option<u64>,
    /// Where it came from.
    pub origin: PriceOrigin,
}

/// A fetched price list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    /// The price.
    pub price: Price,
    /// The model's largest answer.
    pub max_output_tokens: Option<u64>,
}

/// Prices fetched from backends' model lists, by backend then model.
#[derive(Debug, Default)]
pub struct PriceLists {
    lists: RwLock<HashMap<String, Arc<HashMap<String, Listed>>>>,
    /// When each backend's list was fetched (Unix milliseconds).
    fetched: RwLock<HashMap<String, i64>>,
}

impl PriceLists {
    /// Replaces one backend's list.
    pub fn set(&self, backend: &str, list: HashMap<String, Listed>, fetched_ms: i64) {
        self.lists
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend.to_owned(), Arc::new(list));
        self.fetched
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend.to_owned(), fetched_ms);
    }

    /// The listed price of `model` on `backend`.
    pub fn get(&self, backend: &str, model: &str) -> Option<Listed> {
        let lists = self.lists.read().unwrap_or_else(|p| p.into_inner());
        lists.get(backend)?.get(model).copied()
    }

    /// Each backend with a fetched list, and when it was fetched (Unix milliseconds).
    pub fn fetched_backends(&self) -> BTreeMap<String, i64> {
        let fetched = self.fetched.read().unwrap_or_else(|p| p.into_inner());
        fetched.iter().map(|(b, at)| (b.clone(), *at)).collect()
    }

    /// When `backend`'s list was fetched, if ever.
    pub fn fetched_ms(&self, backend: &str) -> Option<i64> {
        self.fetched
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(backend)
            .copied()
    }
}

/// The price of `model` on `backend`: the backend's list first, then `pricing:`.
pub fn quote(lists: &PriceLists, rules: &[PriceRule], backend: &str, model: &str) -> Option<Quote> {
    if let Some(listed) = lists.get(backend, model) {
        return Some(Quote {
            price: listed.price,
            max_output_tokens: listed.max_output_tokens,
            origin: PriceOrigin::List,
        });
    }
    if rules.is_empty() {
        return None;
    }
    let route = format!("{backend}:{model}");
    rules
        .iter()
        .find(|r| r.regex.is_match(&route))
        .map(|r| Quote {
            price: r.price,
            max_output_tokens: r.max_output_tokens,
            origin: PriceOrigin::Config,
        })
}

/// `tokens × per-million price`, summed exactly, rounded half up to a nano-dollar.
fn per_mtok(parts: &[(u64, Nanos)]) -> Nanos {
    let micro: i128 = parts
        .iter()
        .map(|(tokens, price)| i128::from(*tokens) * i128::from(*price))
        .sum();
    let nanos = (micro + 500_000).div_euclid(1_000_000);
    Nanos::try_from(nanos).unwrap_or(Nanos::MAX)
}

/// What `usage` costs at `price`: input read from or written to the prompt cache at its own
/// price where the price names one.
pub fn cost(price: &Price, usage: &Usage) -> Nanos {
    let cached = usage.cached_tokens.unwrap_or(0).min(usage.prompt_tokens);
    let written = usage
        .cache_write_tokens
        .unwrap_or(0)
        .min(usage.prompt_tokens - cached);
    let written_1h = usage.cache_write_1h_tokens.unwrap_or(0).min(written);
    let at = |special: Option<Nanos>| special.unwrap_or(price.prompt_per_mtok);
    let write_1h = price
        .cache_write_1h_prompt_per_mtok
        .or(price.cache_write_prompt_per_mtok);
    per_mtok(&[
        (
            usage.prompt_tokens - cached - written,
            price.prompt_per_mtok,
        ),
        (cached, at(price.cached_prompt_per_mtok)),
        (written - written_1h, at(price.cache_write_prompt_per_mtok)),
        (written_1h, at(write_1h)),
        (usage.completion_tokens, price.completion_per_mtok),
    ])
    .saturating_add(price.request)
}

/// Answer tokens a reservation counts at most, whatever `max_tokens × n` says: far beyond any
/// real answer, and small enough that its price cannot overflow.
const MAX_RESERVED_TOKENS: u64 = 1 << 32;

/// The most a request may cost: its estimated prompt and its longest possible answer, once
/// per choice (`n`; each choice is an answer of up to `max_tokens`).
pub fn worst_case(
    quote: &Quote,
    prompt_tokens: u64,
    max_tokens: Option<u64>,
    choices: u64,
) -> Nanos {
    let answer = max_tokens
        .or(quote.max_output_tokens)
        .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
    // The whole prompt may be written to the cache: it is reserved at the dearest input price.
    let price = quote.price;
    let write = price
        .cache_write_prompt_per_mtok
        .unwrap_or(price.prompt_per_mtok);
    let write_1h = price.cache_write_1h_prompt_per_mtok.unwrap_or(write);
    let dearest = Price {
        prompt_per_mtok: price.prompt_per_mtok.max(write).max(write_1h),
        ..price
    };
    cost(
        &dearest,
        &Usage {
            prompt_tokens: prompt_tokens.min(MAX_RESERVED_TOKENS),
            completion_tokens: answer
                .saturating_mul(choices.max(1))
                .min(MAX_RESERVED_TOKENS),
            ..Usage::default()
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn price(prompt: Nanos, completion: Nanos) -> Price {
        Price {
            prompt_per_mtok: prompt,
            completion_per_mtok: completion,
            cached_prompt_per_mtok: None,
            cache_write_prompt_per_mtok: None,
            cache_write_1h_prompt_per_mtok: None,
            request: 0,
        }
    }

    #[test]
    fn costs_are_exact_and_round_half_up_once() {
        // $2.50 / $10 per million (gpt-4o): 17 in, 1763 out.
        let p = price(2_500_000_000, 10_000_000_000);
        let u = Usage {
            prompt_tokens: 17,
            completion_tokens: 1763,
            ..Usage::default()
        };
        assert_eq!(cost(&p, &u), 17 * 2_500 + 1763 * 10_000);
        // $0.0000375 per million: 0.0375 nano-dollars a token, 13 tokens = 0.4875 → 0; 14 → 0.525 → 1.
        let tiny = price(37_500, 0);
        let n = |t| Usage {
            prompt_tokens: t,
            ..Usage::default()
        };
        assert_eq!(cost(&tiny, &n(13)), 0);
        assert_eq!(cost(&tiny, &n(14)), 1);
    }

    #[test]
    fn cached_tokens_are_priced_once_at_the_cached_price() {
        let mut p = price(3_000_000_000, 15_000_000_000);
        p.cached_prompt_per_mtok = Some(300_000_000);
        p.request = 5;
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 10,
            cached_tokens: Some(800),
            ..Usage::default()
        };
        assert_eq!(cost(&p, &u), 200 * 3_000 + 800 * 300 + 10 * 15_000 + 5);
    }

    #[test]
    fn cache_writes_are_priced_at_the_write_price_or_as_input() {
        // Claude Sonnet: $3 in, $0.30 cache read, $3.75 cache write, $15 out. Anthropic's
        // prompt counts the reads and the writes.
        let mut p = price(3_000_000_000, 15_000_000_000);
        p.cached_prompt_per_mtok = Some(300_000_000);
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 10,
            cached_tokens: Some(500),
            cache_write_tokens: Some(400),
            ..Usage::default()
        };
        let without = cost(&p, &u);
        assert_eq!(without, 500 * 3_000 + 500 * 300 + 10 * 15_000);
        p.cache_write_prompt_per_mtok = Some(3_750_000_000);
        assert_eq!(
            cost(&p, &u),
            100 * 3_000 + 500 * 300 + 400 * 3_750 + 10 * 15_000
        );
        // Counts that do not add up (writes beyond what the prompt leaves) are capped.
        let odd = Usage {
            cache_write_tokens: Some(5_000),
            ..u
        };
        assert_eq!(cost(&p, &odd), 500 * 300 + 500 * 3_750 + 10 * 15_000);
        // Of the 400 written, 100 for an hour: at the hour's price, else at the write price.
        let hour = Usage {
            cache_write_1h_tokens: Some(100),
            ..u
        };
        assert_eq!(cost(&p, &hour), cost(&p, &u));
        p.cache_write_1h_prompt_per_mtok = Some(6_000_000_000);
        assert_eq!(
            cost(&p, &hour),
            100 * 3_000 + 500 * 300 + 300 * 3_750 + 100 * 6_000 + 10 * 15_000
        );
    }

    #[test]
    fn the_list_wins_over_config_and_config_matches_the_route() {
        let lists = PriceLists::default();
        let rules = vec![PriceRule {
            regex: Regex::new("^local:").unwrap(),
            price: price(1, 2),
            max_output_tokens: Some(100),
        }];
        assert_eq!(
            quote(&lists, &rules, "local", "llama").unwrap().origin,
            PriceOrigin::Config
        );
        assert!(quote(&lists, &rules, "openrouter", "llama").is_none());
        let mut list = HashMap::new();
        list.insert(
            "llama".to_owned(),
            Listed {
                price: price(5, 6),
                max_output_tokens: None,
            },
        );
        lists.set("local", list, 1);
        let q = quote(&lists, &rules, "local", "llama").unwrap();
        assert_eq!((q.origin, q.price.prompt_per_mtok), (PriceOrigin::List, 5));
    }

    #[test]
    fn the_worst_case_uses_max_tokens_then_the_model_then_a_default() {
        let q = Quote {
            price: price(1_000_000_000, 2_000_000_000),
            max_output_tokens: Some(100),
            origin: PriceOrigin::Config,
        };
        assert_eq!(worst_case(&q, 10, Some(5), 1), 10 * 1_000 + 5 * 2_000);
        assert_eq!(worst_case(&q, 10, None, 1), 10 * 1_000 + 100 * 2_000);
        let q = Quote {
            max_output_tokens: None,
            ..q
        };
        assert_eq!(
            worst_case(&q, 0, None, 1),
            DEFAULT_MAX_OUTPUT_TOKENS as i64 * 2_000
        );
    }

    #[test]
    fn the_worst_case_counts_every_choice() {
        let q = Quote {
            price: price(1_000_000_000, 2_000_000_000),
            max_output_tokens: Some(300),
            origin: PriceOrigin::Config,
        };
        // The prompt is paid once; each of the `n` answers may be `max_tokens` long.
        assert_eq!(
            worst_case(&q, 10, Some(100), 100),
            10 * 1_000 + 100 * 100 * 2_000
        );
        assert_eq!(worst_case(&q, 10, None, 3), 10 * 1_000 + 3 * 300 * 2_000);
        assert_eq!(
            worst_case(&q, 10, Some(100), 0),
            worst_case(&q, 10, Some(100), 1)
        );
        // Absurd figures are bounded instead of overflowing.
        let most = worst_case(&q, u64::MAX, Some(u64::MAX), u64::MAX);
        assert_eq!(
            most,
            (MAX_RESERVED_TOKENS as i64) * 1_000 + (MAX_RESERVED_TOKENS as i64) * 2_000
        );
    }

    #[test]
    fn the_worst_case_is_never_below_the_cost_whatever_the_cache_did() {
        let mut q = Quote {
            price: price(3_000_000_000, 15_000_000_000),
            max_output_tokens: Some(10),
            origin: PriceOrigin::Config,
        };
        q.price.cached_prompt_per_mtok = Some(300_000_000);
        let spent = |written: u64, for_an_hour: u64| Usage {
            prompt_tokens: 1000,
            completion_tokens: 10,
            cache_write_tokens: Some(written),
            cache_write_1h_tokens: Some(for_an_hour),
            ..Usage::default()
        };
        for (write, write_1h) in [
            (None, None),
            (Some(3_750_000_000), None),
            (Some(3_750_000_000), Some(6_000_000_000)),
        ] {
            q.price.cache_write_prompt_per_mtok = write;
            q.price.cache_write_1h_prompt_per_mtok = write_1h;
            let reserved = worst_case(&q, 1000, None, 1);
            for (written, for_an_hour) in [(0, 0), (1000, 0), (1000, 1000), (400, 100)] {
                assert!(reserved >= cost(&q.price, &spent(written, for_an_hour)));
            }
        }
        assert_eq!(worst_case(&q, 1000, None, 1), 1000 * 6_000 + 10 * 15_000);
    }
}
