//! Budgets: spend caps per scope and UTC window, enforced before dispatch.
//!
//! Each request under a budget reserves its worst-case cost before it is sent; when it ends
//! the reservation is released and the real cost is added to the spend. A request is admitted
//! while spend plus reservations is below the cap, so concurrent requests overspend a cap by at
//! most one request's worst case. Spend is kept per (key, backend, model) and rebuilt from the
//! ledger at start, so it survives restarts and a reloaded budget sees the spend at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use orproxy_plugin::Nanos;
use orproxy_plugin::usage::format_usd;
use regex::Regex;
use serde::Serialize;
use serde_saphyr::Spanned;

use crate::config::{BudgetAction, BudgetConfig, BudgetPeriod, BudgetScope, Diagnostic, Sourced};
use crate::error::ProxyError;
use crate::ledger::Accounts;
use crate::pricing;
use crate::record::Record;
use crate::route::{self, Route};
use crate::selector;
use crate::table::RoutingTable;
use orproxy_ledger::DAY_MS;
use orproxy_plugin::JsonObject;

/// One `budgets:` entry, compiled.
#[derive(Debug, Clone)]
pub struct BudgetRule {
    /// Its name.
    pub name: String,
    /// What it counts.
    pub scope: BudgetScope,
    /// Which keys, backends or models (none: all).
    pub regex: Option<Regex>,
    /// The cap.
    pub limit: Nanos,
    /// The window.
    pub period: BudgetPeriod,
    /// What happens past the cap.
    pub action: BudgetAction,
    /// With `fallback`: where the request goes instead.
    pub fallback: Option<String>,
}

/// Compiles `budgets:`; every problem becomes a diagnostic at its entry.
pub fn build_rules(
    config: Option<&Sourced<Vec<Spanned<BudgetConfig>>>>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<BudgetRule> {
    let Some(list) = config else {
        return Vec::new();
    };
    let mut names = HashMap::new();
    let mut rules = Vec::new();
    for entry in &list.value {
        let b = &entry.value;
        let at = entry.referenced;
        let mut fail = |message: String| errors.push(list.error_at(at, message));
        if let Some(line) = names.insert(b.name.clone(), at.line()) {
            fail(format!(
                "budget `{}` is already defined on line {line}",
                b.name
            ));
            continue;
        }
        let regex = match (&b.pattern, b.scope) {
            (Some(_), BudgetScope::Global) => {
                fail(format!(
                    "budget `{}`: a global budget takes no `match`",
                    b.name
                ));
                continue;
            }
            (Some(p), _) => match Regex::new(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    fail(format!(
                        "budget `{}`: invalid regex `{p}`: {}",
                        b.name,
                        crate::config::one_line(&e.to_string())
                    ));
                    continue;
                }
            },
            (None, _) => None,
        };
        match (b.action, &b.fallback) {
            (BudgetAction::Fallback, None) => {
                fail(format!(
                    "budget `{}`: action fallback needs a `fallback` selector",
                    b.name
                ));
                continue;
            }
            (BudgetAction::Reject, Some(_)) => {
                fail(format!(
                    "budget `{}`: `fallback` is only used with action: fallback",
                    b.name
                ));
                continue;
            }
            (_, Some(f)) => {
                if let Err(e) = selector::parse_chain(f) {
                    fail(format!("budget `{}`: fallback: {e}", b.name));
                    continue;
                }
            }
            _ => {}
        }
        rules.push(BudgetRule {
            name: b.name.clone(),
            scope: b.scope,
            regex,
            limit: b.limit_usd.0,
            period: b.period,
            action: b.action,
            fallback: b.fallback.clone(),
        });
    }
    rules
}

/// Who a request is: what budgets match on and spend is kept by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Subject {
    /// Proxy key name.
    pub key: Option<String>,
    /// Backend.
    pub backend: String,
    /// Upstream model.
    pub model: String,
}

impl BudgetRule {
    /// Whether the budget counts `subject`; for key budgets, the key's own instance.
    fn instance(&self, subject: &Subject) -> Option<String> {
        let matches = |text: &str| self.regex.as_ref().is_none_or(|r| r.is_match(text));
        match self.scope {
            BudgetScope::Global => Some(self.name.clone()),
            // Requests without a key (auth off) are not counted by key budgets.
            BudgetScope::Key => {
                let key = subject.key.as_deref()?;
                matches(key).then(|| format!("{}/{key}", self.name))
            }
            BudgetScope::Backend => matches(&subject.backend).then(|| self.name.clone()),
            BudgetScope::Model => matches(&subject.model).then(|| self.name.clone()),
        }
    }

    fn counts(&self, instance: &str, subject: &Subject) -> bool {
        match self.scope {
            BudgetScope::Key => self.instance(subject).as_deref() == Some(instance),
            _ => self.instance(subject).is_some(),
        }
    }
}

/// The UTC window of `period` containing `now_ms`: start, and end (none for `total`).
pub fn window(period: BudgetPeriod, now_ms: i64) -> (i64, Option<i64>) {
    let day = now_ms.div_euclid(DAY_MS);
    match period {
        BudgetPeriod::Total => (i64::MIN, None),
        BudgetPeriod::Day => (day * DAY_MS, Some((day + 1) * DAY_MS)),
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                days_from_civil(y, m, 1) * DAY_MS,
                Some(days_from_civil(ny, nm, 1) * DAY_MS),
            )
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-12-01T00:00:00Z`.
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let secs = ms.rem_euclid(DAY_MS) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Spend of one subject: all time, and the current day and month.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    total: Nanos,
    day_start: i64,
    day: Nanos,
    month_start: i64,
    month: Nanos,
}

impl Sums {
    /// Saturating: an upstream may report any cost, and a sum that wrapped would read as
    /// money to spend.
    fn add(&mut self, cost: Nanos, at_ms: i64) {
        self.total = self.total.saturating_add(cost);
        let (day_start, _) = window(BudgetPeriod::Day, at_ms);
        let (month_start, _) = window(BudgetPeriod::Month, at_ms);
        if day_start > self.day_start {
            (self.day_start, self.day) = (day_start, 0);
        }
        if month_start > self.month_start {
            (self.month_start, self.month) = (month_start, 0);
        }
        if day_start == self.day_start {
            self.day = self.day.saturating_add(cost);
        }
        if month_start == self.month_start {
            self.month = self.month.saturating_add(cost);
        }
    }

    fn in_window(&self, period: BudgetPeriod, now_ms: i64) -> Nanos {
        let (start, _) = window(period, now_ms);
        match period {
            BudgetPeriod::Total => self.total,
            BudgetPeriod::Day if self.day_start == start => self.day,
            BudgetPeriod::Month if self.month_start == start => self.month,
            _ => 0,
        }
    }
}

/// Hashed with foldhash: every answered request settles here, and SipHash took as long as the
/// rest of the settling (subjects are names a request cannot invent without an answer).
#[derive(Default)]
struct Book {
    spend: foldhash::HashMap<Subject, Sums>,
    /// Reserved worst cases per budget instance.
    reserved: foldhash::HashMap<String, Nanos>,
    rules: Arc<Vec<BudgetRule>>,
}

impl Book {
    fn spent(&self, rule: &BudgetRule, instance: &str, now_ms: i64) -> Nanos {
        self.spend
            .iter()
            .filter(|(subject, _)| rule.counts(instance, subject))
            .map(|(_, sums)| sums.in_window(rule.period, now_ms))
            .fold(0, Nanos::saturating_add)
    }
}

/// Spend and reservations of every budget; one per daemon, kept across reloads.
#[derive(Default)]
pub struct BudgetBook {
    book: Mutex<Book>,
}

/// A budget a request ran into.
#[derive(Debug, Clone)]
pub struct Exceeded {
    /// The budget.
    pub rule: BudgetRule,
    /// When its window starts again (none for `total`).
    pub resets: Option<String>,
}

/// Worst-case costs held for one request until it ends.
#[derive(Debug, Default)]
pub struct Reservation {
    /// `(budget instance, budget name, amount held)`.
    holds: Vec<(String, String, Nanos)>,
    /// The worst case of one attempt, held in each.
    worst: Nanos,
}

/// One budget's state, for `/admin/budgets`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Budget name (with `/key` for a key's own cap).
    pub name: String,
    /// Scope.
    pub scope: BudgetScope,
    /// Window.
    pub period: BudgetPeriod,
    /// The cap, USD.
    pub limit_usd: String,
    /// Spent in the window, USD.
    pub spent_usd: String,
    /// Held by requests in flight, USD.
    pub reserved_usd: String,
    /// Left (never below zero), USD.
    pub remaining_usd: String,
    /// Window start (RFC 3339), none for `total`.
    pub window_start: Option<String>,
    /// Window end, none for `total`.
    pub window_end: Option<String>,
    /// Exact figures in nano-dollars.
    pub limit_nanos: Nanos,
    /// See `spent_usd`.
    pub spent_nanos: Nanos,
    /// See `reserved_usd`.
    pub reserved_nanos: Nanos,
}

impl BudgetBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the budgets of a (re)loaded table; spend and reservations carry over.
    pub fn set_rules(&self, rules: Arc<Vec<BudgetRule>>) {
        self.lock().rules = rules;
    }

    /// Adds spend recorded before this process started (from the ledger).
    pub fn preload(&self, subject: Subject, cost: Nanos, at_ms: i64) {
        self.lock()
            .spend
            .entry(subject)
            .or_default()
            .add(cost, at_ms);
    }

    /// Reserves `worst` once in every budget counting any of `subjects` (the targets of a
    /// failover chain: any may serve), or names the first one whose cap is already reached
    /// (nothing is reserved then). With `hold` false it only checks (nothing is reserved).
    /// Budgets named in `passed` are not checked (the request is already on their fallback).
    pub fn reserve(
        &self,
        subjects: &[Subject],
        worst: Nanos,
        now_ms: i64,
        passed: &[String],
        hold: bool,
    ) -> Result<Reservation, Exceeded> {
        let mut book = self.lock();
        let rules = Arc::clone(&book.rules);
        let mut holds = Vec::new();
        for rule in rules.iter().filter(|r| !passed.contains(&r.name)) {
            let Some(instance) = subjects.iter().find_map(|s| rule.instance(s)) else {
                continue;
            };
            let used = book
                .spent(rule, &instance, now_ms)
                .saturating_add(book.reserved.get(&instance).copied().unwrap_or(0));
            if used >= rule.limit {
                return Err(Exceeded {
                    rule: rule.clone(),
                    resets: window(rule.period, now_ms).1.map(rfc3339),
                });
            }
            holds.push((instance, rule.name.clone(), worst));
        }
        if !hold {
            return Ok(Reservation::default());
        }
        for (instance, _, worst) in &holds {
            let held = book.reserved.entry(instance.clone()).or_default();
            *held = held.saturating_add(*worst);
        }
        Ok(Reservation { holds, worst })
    }

    /// Holds `cost`, which a failed attempt of the request reported and which will be billed
    /// with it, on top of its reservation, and says whether another attempt may follow: only
    /// while every budget holding it would still admit the request (spend and reservations,
    /// this one's failed costs included, under the cap), so that a chain of billed failures
    /// cannot spend past a cap by more than one attempt's worst case. `Err` names the first
    /// budget left without room.
    pub fn hold_failed_cost(
        &self,
        reservation: &mut Reservation,
        cost: Nanos,
        now_ms: i64,
    ) -> Result<(), String> {
        let mut book = self.lock();
        let rules = Arc::clone(&book.rules);
        let mut full = None;
        for (instance, name, held) in &mut reservation.holds {
            *held = held.saturating_add(cost);
            let reserved = book.reserved.entry(instance.clone()).or_default();
            *reserved = reserved.saturating_add(cost);
            let reserved = *reserved;
            let Some(rule) = rules.iter().find(|r| r.name == *name) else {
                continue;
            };
            let used = book
                .spent(rule, instance, now_ms)
                .saturating_add(reserved)
                .saturating_sub(reservation.worst);
            if used >= rule.limit && full.is_none() {
                full = Some(rule.name.clone());
            }
        }
        full.map_or(Ok(()), Err)
    }

    /// Ends a request: releases its reservation and adds its real cost to `subject`'s spend.
    pub fn settle(
        &self,
        reservation: Reservation,
        subject: Option<&Subject>,
        cost: Nanos,
        at_ms: i64,
    ) {
        let mut book = self.lock();
        for (instance, _, worst) in reservation.holds {
            if let Some(held) = book.reserved.get_mut(&instance) {
                *held = held.saturating_sub(worst);
                if *held <= 0 {
                    book.reserved.remove(&instance);
                }
            }
        }
        if let Some(subject) = subject.filter(|_| cost != 0) {
            // Most requests add to a subject already known: no key to build for those.
            match book.spend.get_mut(subject) {
                Some(sums) => sums.add(cost, at_ms),
                None => book
                    .spend
                    .entry(subject.clone())
                    .or_default()
                    .add(cost, at_ms),
            }
        }
    }

    /// Every budget's figures now (a key budget once per key that has spent or reserved).
    pub fn status(&self, now_ms: i64) -> Vec<Status> {
        let book = self.lock();
        let mut out = Vec::new();
        for rule in book.rules.iter() {
            let mut instances: Vec<String> = match rule.scope {
                BudgetScope::Key => {
                    let mut keys: Vec<String> = book
                        .spend
                        .keys()
                        .filter_map(|s| rule.instance(s))
                        .chain(
                            book.reserved
                                .keys()
                                .filter(|i| i.starts_with(&format!("{}/", rule.name)))
                                .cloned(),
                        )
                        .collect();
                    keys.sort();
                    keys.dedup();
                    keys
                }
                _ => vec![rule.name.clone()],
            };
            if instances.is_empty() {
                instances.push(format!("{}/", rule.name));
            }
            let (start, end) = window(rule.period, now_ms);
            for instance in instances {
                let spent = book.spent(rule, &instance, now_ms);
                let reserved = book.reserved.get(&instance).copied().unwrap_or(0);
                let remaining = left(rule.limit, spent, reserved);
                out.push(Status {
                    name: instance,
                    scope: rule.scope,
                    period: rule.period,
                    limit_usd: format_usd(rule.limit),
                    spent_usd: format_usd(spent),
                    reserved_usd: format_usd(reserved),
                    remaining_usd: format_usd(remaining),
                    window_start: end.map(|_| rfc3339(start)),
                    window_end: end.map(rfc3339),
                    limit_nanos: rule.limit,
                    spent_nanos: spent,
                    reserved_nanos: reserved,
                });
            }
        }
        out
    }

    /// USD spent by the subject's key, backend or model (or by everyone) in a period.
    fn spent_usd(&self, subject: &Subject, scope: &str, period: &str, now_ms: i64) -> f64 {
        let period = match period {
            "day" => BudgetPeriod::Day,
            "month" => BudgetPeriod::Month,
            _ => BudgetPeriod::Total,
        };
        let book = self.lock();
        let nanos: Nanos = book
            .spend
            .iter()
            .filter(|(s, _)| match scope {
                "key" => s.key == subject.key,
                "backend" => s.backend == subject.backend,
                "model" => s.model == subject.model,
                _ => true,
            })
            .map(|(_, sums)| sums.in_window(period, now_ms))
            .fold(0, Nanos::saturating_add);
        nanos as f64 / 1e9
    }

    /// USD left in the named budget (for a key budget: the subject key's own).
    fn budget_left(&self, subject: &Subject, name: &str, now_ms: i64) -> f64 {
        let book = self.lock();
        let Some(rule) = book.rules.iter().find(|r| r.name == name) else {
            return orproxy_rules::UNLIMITED;
        };
        let instance = rule.instance(subject).unwrap_or_else(|| rule.name.clone());
        let spent = book.spent(rule, &instance, now_ms);
        let reserved = book.reserved.get(&instance).copied().unwrap_or(0);
        left(rule.limit, spent, reserved) as f64 / 1e9
    }
}

/// What a cap leaves after spend and reservations, never below zero.
fn left(limit: Nanos, spent: Nanos, reserved: Nanos) -> Nanos {
    limit.saturating_sub(spent).saturating_sub(reserved).max(0)
}

/// How many budget fallbacks one request may follow (a fallback may itself be capped; the
/// last one reached is refused).
const MAX_FALLBACKS: usize = 4;

/// The budget step of the pipeline: reserves the request's worst case in every budget that
/// counts it, sends it to a budget's fallback, or refuses it with 402.
pub fn admit(
    table: &RoutingTable,
    accounts: &Accounts,
    body: &JsonObject,
    route: &mut Route,
    record: &mut Record,
) -> Result<(), ProxyError> {
    record.prompt_estimate = route::prompt_estimate(body);
    if table.budgets.is_empty() {
        return Ok(());
    }
    let request = Request {
        key: &record.key,
        body,
        prompt_estimate: record.prompt_estimate,
    };
    record.reservation = admission(table, accounts, &request, route, Admission::Reserve)?;
    record.route = route.targets.first().map(route::Target::label);
    Ok(())
}

/// What [`admit`] would do with a request now, holding nothing and counting nothing: the
/// route it would serve (after fallbacks and skipped targets), or its refusal.
pub fn preview(
    table: &RoutingTable,
    accounts: &Accounts,
    key: &Option<String>,
    body: &JsonObject,
    route: &mut Route,
) -> Result<(), ProxyError> {
    let request = Request {
        key,
        body,
        prompt_estimate: route::prompt_estimate(body),
    };
    admission(table, accounts, &request, route, Admission::Preview).map(drop)
}

/// Whether admission holds the worst case (a request) or only looks (explain).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admission {
    Reserve,
    Preview,
}

/// What admission needs to know of a request.
struct Request<'a> {
    key: &'a Option<String>,
    body: &'a JsonObject,
    prompt_estimate: u64,
}

fn admission(
    table: &RoutingTable,
    accounts: &Accounts,
    request: &Request<'_>,
    route: &mut Route,
    mode: Admission,
) -> Result<Reservation, ProxyError> {
    let count = |budget: &str, action: &'static str| {
        if mode == Admission::Reserve {
            crate::metrics::budget_rejection(budget, action);
        }
    };
    // Budgets whose fallback the request is on: it is not refused by them again (their spend
    // still counts), so that a capped global budget can send requests to a free model.
    let mut passed: Vec<String> = Vec::new();
    let mut visited: Vec<String> = route
        .targets
        .iter()
        .take(1)
        .map(route::Target::label)
        .collect();
    let mut hops = 0;
    loop {
        // Every target of the chain may end up serving (a failure or a cool-down skips those
        // before it), so each one's budgets hold the request's worst case.
        let subject = |t: &route::Target| Subject {
            key: request.key.clone(),
            backend: t.backend.clone(),
            model: t.model.clone(),
        };
        let subjects: Vec<Subject> = route.targets.iter().map(subject).collect();
        let counted = table
            .budgets
            .iter()
            .any(|r| !passed.contains(&r.name) && subjects.iter().any(|s| r.instance(s).is_some()));
        if !counted {
            return Ok(Reservation::default());
        }
        let mut worst = 0;
        for (target, subject) in route.targets.iter().zip(&subjects) {
            // A target no budget counts needs no price: nothing it spends is capped.
            let Some(covering) = table
                .budgets
                .iter()
                .find(|r| !passed.contains(&r.name) && r.instance(subject).is_some())
            else {
                continue;
            };
            let quote = pricing::quote(
                &accounts.prices,
                &table.pricing,
                &target.backend,
                &target.model,
            )
            .ok_or_else(|| {
                count(&covering.name, "reject");
                ProxyError::NoPrice {
                    budget: covering.name.clone(),
                    route: target.label(),
                }
            })?;
            let (max_tokens, choices) = answer_limits(target, request.body);
            worst = worst.max(pricing::worst_case(
                &quote,
                request.prompt_estimate,
                max_tokens,
                choices,
            ));
        }
        let hold = mode == Admission::Reserve;
        let reserved = accounts
            .budgets
            .reserve(&subjects, worst, now_ms(), &passed, hold);
        let Exceeded { rule, resets } = match reserved {
            Ok(reservation) => return Ok(reservation),
            Err(exceeded) => exceeded,
        };
        if rule.instance(&subjects[0]).is_none() {
            // Only later targets of the chain are over this cap: the request goes on without
            // them (each pass removes at least one target, so this ends).
            count(&rule.name, "skip");
            route
                .targets
                .retain(|t| rule.instance(&subject(t)).is_none());
            continue;
        }
        // A fallback that leads back to a route already refused (budgets falling back on each
        // other) would serve what its cap refused: it counts as no fallback.
        let fallback = match &rule.fallback {
            Some(fallback) if hops < MAX_FALLBACKS => {
                let (targets, triggers) = route::fallback_chain(table, fallback)?;
                let first = targets
                    .first()
                    .map(route::Target::label)
                    .unwrap_or_default();
                (!visited.contains(&first)).then_some((targets, triggers, first))
            }
            _ => None,
        };
        match fallback {
            Some((targets, triggers, first)) => {
                hops += 1;
                count(&rule.name, "fallback");
                route.targets = targets;
                route.triggers = triggers;
                visited.push(first);
                passed.push(rule.name);
            }
            None => {
                count(&rule.name, "reject");
                return Err(ProxyError::BudgetExceeded {
                    budget: rule.name,
                    limit_usd: format_usd(rule.limit),
                    period: match rule.period {
                        BudgetPeriod::Day => "per day",
                        BudgetPeriod::Month => "per month",
                        BudgetPeriod::Total => "in total",
                    },
                    resets,
                });
            }
        }
    }
}

/// What a target will be sent as the answer's bounds: `max_completion_tokens` or `max_tokens`
/// (none: the model's own limit applies), and the number of choices `n` (at least 1). The
/// target's parameters (URI or rules) win over the body's, and a field a rule removed counts
/// as absent, as in the body each attempt sends.
pub fn answer_limits(target: &route::Target, body: &JsonObject) -> (Option<u64>, u64) {
    let param = |name: &str| -> Option<serde_json::Value> {
        if let Some((_, value)) = target.params.iter().find(|(k, _)| k == name) {
            return Some(value.clone());
        }
        if target.unset.iter().any(|k| k == name) {
            return None;
        }
        serde_json::from_str(body.get(name)?.get()).ok()
    };
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| param(k).as_ref().and_then(serde_json::Value::as_u64));
    // Upstreams read `n: 2.0` or `n: "2"` as two choices; anything that is not a whole
    // number is refused upstream, and counts as one.
    let choices = param("n")
        .and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0)
                    .map(|f| f as u64)
            }),
            serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        })
        .unwrap_or(1)
        .max(1);
    (max_tokens, choices)
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What rule scripts' `spent_usd` and `budget_left` read.
pub struct SpendHost {
    book: Arc<BudgetBook>,
    subject: Subject,
}

impl SpendHost {
    /// The host for requests before their route is known.
    pub fn new(book: Arc<BudgetBook>) -> SpendHost {
        SpendHost {
            book,
            subject: Subject::default(),
        }
    }
}

impl orproxy_rules::Host for SpendHost {
    fn spent_usd(&self, scope: &str, period: &str) -> f64 {
        self.book.spent_usd(&self.subject, scope, period, now_ms())
    }

    fn budget_left(&self, name: &str) -> f64 {
        self.book.budget_left(&self.subject, name, now_ms())
    }

    fn for_request(
        &self,
        key: Option<&str>,
        backend: &str,
        model: &str,
    ) -> Option<Arc<dyn orproxy_rules::Host>> {
        Some(Arc::new(SpendHost {
            book: Arc::clone(&self.book),
            subject: Subject {
                key: key.map(str::to_owned),
                backend: backend.to_owned(),
                model: model.to_owned(),
            },
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(
        name: &str,
        scope: BudgetScope,
        pattern: Option<&str>,
        limit: Nanos,
        period: BudgetPeriod,
    ) -> BudgetRule {
        BudgetRule {
            name: name.into(),
            scope,
            regex: pattern.map(|p| Regex::new(p).unwrap()),
            limit,
            period,
            action: BudgetAction::Reject,
            fallback: None,
        }
    }

    fn subject(key: &str, backend: &str, model: &str) -> Subject {
        Subject {
            key: Some(key.into()),
            backend: backend.into(),
            model: model.into(),
        }
    }

    #[test]
    fn windows_are_utc_days_and_months() {
        // 2026-11-24T03:04:05Z
        let now = days_from_civil(2026, 11, 24) * DAY_MS + (3 * 3600 + 4 * 60 + 5) * 1000;
        assert_eq!(rfc3339(now), "2026-11-24T03:04:05Z");
        let (start, end) = window(BudgetPeriod::Day, now);
        assert_eq!(
            (rfc3339(start), rfc3339(end.unwrap())),
            ("2026-11-24T00:00:00Z".into(), "2026-11-25T00:00:00Z".into())
        );
        let (start, end) = window(BudgetPeriod::Month, now);
        assert_eq!(
            (rfc3339(start), rfc3339(end.unwrap())),
            ("2026-11-01T00:00:00Z".into(), "2026-12-01T00:00:00Z".into())
        );
        let dec = days_from_civil(2026, 12, 31) * DAY_MS;
        assert_eq!(
            rfc3339(window(BudgetPeriod::Month, dec).1.unwrap()),
            "2027-01-01T00:00:00Z"
        );
        for day in [-800_000, -1, 0, 59, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn concurrent_reservations_overspend_by_at_most_one_worst_case() {
        let book = Arc::new(BudgetBook::default());
        book.set_rules(Arc::new(vec![rule(
            "cap",
            BudgetScope::Global,
            None,
            1_000,
            BudgetPeriod::Total,
        )]));
        let s = subject("k", "b", "m");
        let worst = 300;
        let admitted: Vec<Reservation> = (0..64)
            .filter_map(|_| {
                book.reserve(std::slice::from_ref(&s), worst, 0, &[], true)
                    .ok()
            })
            .collect();
        // 0, 300, 600, 900 are below the cap: four are admitted, holding 1200.
        assert_eq!(admitted.len(), 4);
        for r in admitted {
            book.settle(r, Some(&s), worst, 0);
        }
        let status = &book.status(0)[0];
        assert_eq!((status.spent_nanos, status.reserved_nanos), (1_200, 0));
        assert!(status.spent_nanos <= 1_000 + worst);
        let exceeded = book
            .reserve(std::slice::from_ref(&s), 1, 0, &[], true)
            .unwrap_err();
        assert_eq!(exceeded.rule.name, "cap");
        assert!(exceeded.resets.is_none());
    }

    fn target(params: &[(&str, serde_json::Value)], unset: &[&str]) -> route::Target {
        route::Target {
            backend: "b".into(),
            model: "m".into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            unset: unset.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    #[test]
    fn answer_limits_count_every_choice_from_the_body_or_the_parameters() {
        use serde_json::json;
        let body = |text: &str| JsonObject::parse(text.as_bytes()).unwrap();
        let plain = target(&[], &[]);
        let limits = |t: &route::Target, text: &str| answer_limits(t, &body(text));
        assert_eq!(limits(&plain, r#"{"messages":[]}"#), (None, 1));
        assert_eq!(
            limits(&plain, r#"{"n":100,"max_tokens":100}"#),
            (Some(100), 100)
        );
        assert_eq!(
            limits(&plain, r#"{"max_completion_tokens":7,"max_tokens":100}"#),
            (Some(7), 1)
        );
        // Whole numbers in other clothes are choices too; the rest count as one.
        for (n, choices) in [
            ("2.0", 2),
            (r#""3""#, 3),
            ("0", 1),
            ("-4", 1),
            ("2.5", 1),
            ("null", 1),
            (r#""many""#, 1),
            ("[5]", 1),
        ] {
            assert_eq!(
                limits(&plain, &format!(r#"{{"n":{n}}}"#)).1,
                choices,
                "n: {n}"
            );
        }
        // URI parameters and rules win over the body; a removed field is not sent.
        let with_params = target(&[("n", json!(8)), ("max_tokens", json!(50))], &[]);
        assert_eq!(
            limits(&with_params, r#"{"n":1,"max_tokens":5}"#),
            (Some(50), 8)
        );
        let unset = target(&[], &["n", "max_tokens"]);
        assert_eq!(limits(&unset, r#"{"n":9,"max_tokens":5}"#), (None, 1));
    }

    #[test]
    fn requests_with_many_choices_overspend_by_at_most_one_worst_case() {
        use orproxy_plugin::Price;
        let quote = pricing::Quote {
            price: Price {
                prompt_per_mtok: 1_000_000_000,
                completion_per_mtok: 2_000_000_000,
                cached_prompt_per_mtok: None,
                cache_write_prompt_per_mtok: None,
                cache_write_1h_prompt_per_mtok: None,
                request: 0,
            },
            max_output_tokens: None,
            origin: pricing::PriceOrigin::Config,
        };
        let request = JsonObject::parse(br#"{"n":100,"max_tokens":100,"messages":[]}"#).unwrap();
        let (max_tokens, choices) = answer_limits(&target(&[], &[]), &request);
        let worst = pricing::worst_case(&quote, 10, max_tokens, choices);
        assert_eq!(worst, 10 * 1_000 + 100 * 100 * 2_000);
        let limit = 10_000_000;
        let book = BudgetBook::default();
        book.set_rules(Arc::new(vec![rule(
            "cap",
            BudgetScope::Global,
            None,
            limit,
            BudgetPeriod::Total,
        )]));
        let s = subject("k", "b", "m");
        let admitted: Vec<Reservation> = (0..32)
            .filter_map(|_| {
                book.reserve(std::slice::from_ref(&s), worst, 0, &[], true)
                    .ok()
            })
            .collect();
        // Every admitted request may really produce n answers of max_tokens each.
        let could_spend = admitted.len() as i64 * worst;
        assert!(could_spend <= limit + worst, "{} admitted", admitted.len());
        assert_eq!(admitted.len(), 1);
    }

    #[test]
    fn key_budgets_are_per_key_and_scopes_match() {
        let book = BudgetBook::default();
        book.set_rules(Arc::new(vec![
            rule(
                "per-team",
                BudgetScope::Key,
                Some("^team-"),
                100,
                BudgetPeriod::Day,
            ),
            rule(
                "claude",
                BudgetScope::Model,
                Some("claude"),
                1_000,
                BudgetPeriod::Month,
            ),
        ]));
        let a = subject("team-a", "or", "anthropic/claude-3");
        let b = subject("team-b", "or", "openai/gpt-4o");
        book.settle(Reservation::default(), Some(&a), 150, 10);
        assert!(
            book.reserve(std::slice::from_ref(&a), 1, 20, &[], true)
                .is_err()
        );
        assert!(
            book.reserve(std::slice::from_ref(&b), 1, 20, &[], true)
                .is_ok()
        );
        assert!(
            book.reserve(&[subject("ops", "or", "x")], 1, 20, &[], true)
                .is_ok()
        );
        // The next UTC day opens a new window.
        assert!(
            book.reserve(std::slice::from_ref(&a), 1, DAY_MS + 1, &[], true)
                .is_ok()
        );
        let names: Vec<String> = book.status(20).into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"per-team/team-a".to_owned()), "{names:?}");
        assert!(names.contains(&"claude".to_owned()), "{names:?}");
    }

    #[test]
    fn a_chain_holds_in_the_budgets_of_every_target_once() {
        let book = BudgetBook::default();
        book.set_rules(Arc::new(vec![
            rule(
                "claude",
                BudgetScope::Model,
                Some("claude"),
                1_000,
                BudgetPeriod::Day,
            ),
            rule("all", BudgetScope::Global, None, 10_000, BudgetPeriod::Day),
        ]));
        let cheap = subject("k", "or", "cheap");
        let claude = subject("k", "or", "anthropic/claude-3");
        let chain = [cheap.clone(), claude.clone()];
        let held = book.reserve(&chain, 600, 0, &[], true).unwrap();
        let reserved = |name: &str| {
            book.status(0)
                .into_iter()
                .find(|s| s.name == name)
                .map(|s| s.reserved_nanos)
        };
        assert_eq!(
            (reserved("claude"), reserved("all")),
            (Some(600), Some(600))
        );
        book.settle(held, Some(&claude), 1_000, 0);
        // The claude cap is reached: a chain that ends on claude names it, one without it passes.
        let exceeded = book.reserve(&chain, 1, 0, &[], true).unwrap_err();
        assert_eq!(exceeded.rule.name, "claude");
        assert!(
            book.reserve(std::slice::from_ref(&cheap), 1, 0, &[], true)
                .is_ok()
        );
    }

    #[test]
    fn failed_attempts_billed_costs_are_held_and_end_the_room_for_more() {
        let book = BudgetBook::default();
        book.set_rules(Arc::new(vec![rule(
            "cap",
            BudgetScope::Global,
            None,
            1_000,
            BudgetPeriod::Day,
        )]));
        let s = subject("k", "b", "m");
        let mut held = book
            .reserve(std::slice::from_ref(&s), 300, 0, &[], true)
            .unwrap();
        // 200 billed for a failure: 200 used before this request's next attempt, room left.
        assert_eq!(book.hold_failed_cost(&mut held, 200, 0), Ok(()));
        assert_eq!(book.status(0)[0].reserved_nanos, 500);
        // 900 more: 1,100 used, no room for another attempt.
        assert_eq!(
            book.hold_failed_cost(&mut held, 900, 0),
            Err("cap".to_owned())
        );
        book.settle(held, Some(&s), 1_100, 0);
        let status = &book.status(0)[0];
        assert_eq!((status.reserved_nanos, status.spent_nanos), (0, 1_100));
    }

    #[test]
    fn absurd_upstream_costs_saturate_and_keep_the_cap_closed() {
        let book = BudgetBook::default();
        book.set_rules(Arc::new(vec![rule(
            "all",
            BudgetScope::Global,
            None,
            100,
            BudgetPeriod::Month,
        )]));
        let s = subject("k", "or", "m");
        // Spend already there, then the largest cost an upstream can report, twice: a
        // wrapping sum would come out negative and reopen the cap.
        book.settle(Reservation::default(), Some(&s), 2_000, 10);
        book.settle(Reservation::default(), Some(&s), Nanos::MAX, 10);
        book.settle(Reservation::default(), Some(&s), Nanos::MAX, 10);
        assert!(
            book.reserve(std::slice::from_ref(&s), 1, 20, &[], true)
                .is_err()
        );
        let status = &book.status(20)[0];
        assert_eq!(status.spent_nanos, Nanos::MAX);
        assert_eq!(status.remaining_usd, "0.000000000");
        // Spread over subjects, the budget's sum saturates too (and so do the rules' helpers).
        let other = subject("k", "or", "other");
        book.settle(Reservation::default(), Some(&other), 20_000, 10);
        assert!(
            book.reserve(std::slice::from_ref(&other), 1, 20, &[], true)
                .is_err()
        );
        assert_eq!(book.status(20)[0].spent_nanos, Nanos::MAX);
        let host = SpendHost::new(Arc::new(book));
        assert!(
            orproxy_rules::Host::spent_usd(&host, "global", "total") > 9e9,
            "saturated, not wrapped"
        );
    }
}
