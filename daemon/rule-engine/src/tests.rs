use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

fn compile(scripts: &[(&str, &str)]) -> RuleSet {
    let sources: Vec<(String, String)> = scripts
        .iter()
        .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
        .collect();
    RuleSet::compile(&sources, Sandbox::default()).unwrap_or_else(|e| panic!("{e:?}"))
}

fn request() -> RouteRequest {
    RouteRequest {
        model: "gpt-4o".into(),
        backend: "openrouter".into(),
        params: [("temperature".to_owned(), json!(1.0))]
            .into_iter()
            .collect(),
        key: "team-a".into(),
        prompt_tokens: 120,
        max_tokens: 256,
        messages: 2,
        client_ip: "10.0.0.7".into(),
        ..RouteRequest::default()
    }
}

fn run(rules: &RuleSet) -> Result<(RouteRequest, Vec<Change>), RuleFailure> {
    rules.run(request(), Arc::new(NoLedger), Some(1_795_478_400))
}

#[test]
fn scripts_change_the_request_through_the_handle() {
    let rules = compile(&[(
        "10-route.rhai",
        r#"
        fn on_request(req) {
            if req.model.starts_with("gpt-") {
                req.model = "openai/" + req.model;
                req.params.temperature = 0.2;
                req.params.top_p = 0.9;
                req.headers["x-team"] = req.key;
                req.failover = ["local:llama3"];
                req.tags.tier = "gold";
            }
        }
        "#,
    )]);
    let (out, trace) = run(&rules).unwrap();
    assert_eq!(out.model, "openai/gpt-4o");
    assert_eq!(out.params["temperature"], json!(0.2));
    assert_eq!(out.params["top_p"], json!(0.9));
    assert_eq!(out.headers["x-team"], "team-a");
    assert_eq!(out.failover, ["local:llama3"]);
    assert_eq!(out.tags["tier"], json!("gold"));
    let fields: Vec<&str> = trace.iter().map(|c| c.field).collect();
    assert_eq!(fields, ["model", "params", "headers", "failover", "tags"]);
    assert_eq!(json!(trace[0].before), json!("gpt-4o"));
    assert_eq!(
        json!(trace[1].after),
        json!({"temperature": 0.2, "top_p": 0.9})
    );
    assert_eq!(json!(trace[4].before), json!({}));
    assert_eq!(&*trace[0].script, "10-route.rhai");
}

#[test]
fn values_cross_between_json_and_scripts_unchanged() {
    let rules = compile(&[(
        "20-values.rhai",
        r#"
        fn on_request(req) {
            // Read back what the request holds, then write every kind of value.
            req.tags.seen = req.params;
            req.tags.kinds = [(), true, 7, 1.5, "text", 'c', [1, [2]], #{ a: #{ b: "c" } }];
            req.tags.nan = 0.0 / 0.0;
            req.tags.handle = req;
            req.headers["x-number"] = 42;
            // Written but left as it was: no change in the trace.
            req.model = req.model;
        }
        "#,
    )]);
    let (out, trace) = run(&rules).unwrap();
    assert_eq!(
        out.tags["seen"],
        serde_json::to_value(&request().params).unwrap()
    );
    assert_eq!(
        out.tags["kinds"],
        json!([null, true, 7, 1.5, "text", "c", [1, [2]], {"a": {"b": "c"}}])
    );
    assert_eq!(out.tags["nan"], json!(null));
    assert_eq!(out.tags["handle"], json!(null));
    assert_eq!(out.headers["x-number"], "42");
    let fields: Vec<&str> = trace.iter().map(|c| c.field).collect();
    assert_eq!(fields, ["tags", "headers"]);
    assert_eq!(json!(trace[1].after), json!({"x-number": "42"}));
}

#[test]
fn scripts_run_in_order_and_a_rejection_stops_them() {
    let rules = compile(&[
        (
            "10-a.rhai",
            r#"fn on_request(req) { if req.prompt_tokens > 100 { req.reject(413, "prompt too long"); } }"#,
        ),
        (
            "20-b.rhai",
            r#"fn on_request(req) { req.model = "never"; }"#,
        ),
    ]);
    let (out, trace) = run(&rules).unwrap();
    assert_eq!(
        out.rejection,
        Some(Rejection {
            status: 413,
            message: "prompt too long".into()
        })
    );
    assert_eq!(out.model, "gpt-4o");
    assert_eq!(trace.len(), 1);
}

#[test]
fn read_only_facts_and_helpers() {
    let rules = compile(&[(
        "h.rhai",
        r#"
        fn on_request(req) {
            let t = now();
            req.tags.hour = t.hour;
            req.tags.weekday = t.weekday;
            req.tags.spent = spent_usd("key", "day");
            req.tags.left = budget_left("monthly") > 1000000.0 && budget_left("monthly") > 5.0;
            req.tags.m = matches(req.model, "^gpt-\\d");
            req.tags.r = regex_replace(req.model, "^gpt-", "openai/gpt-");
            req.tags.facts = [req.key, req.prompt_tokens, req.max_tokens, req.stream, req.messages, req.client_ip];
        }
        "#,
    )]);
    let (out, _) = run(&rules).unwrap();
    assert_eq!(out.tags["hour"], json!(0));
    assert_eq!(out.tags["weekday"], json!(2));
    assert_eq!(out.tags["spent"], json!(0.0));
    assert_eq!(out.tags["left"], json!(true));
    assert_eq!(out.tags["m"], json!(true));
    assert_eq!(out.tags["r"], json!("openai/gpt-4o"));
    assert_eq!(
        out.tags["facts"],
        json!(["team-a", 120, 256, false, 2, "10.0.0.7"])
    );
}

#[test]
fn scripts_without_the_hook_are_fine_and_read_only_facts_stay_read_only() {
    let rules = compile(&[("const.rhai", "let x = 1;")]);
    assert_eq!(run(&rules).unwrap().0, request());
    let err = RuleSet::compile(
        &[(
            "bad.rhai".into(),
            "fn on_request(req) { req.key = \"x\"; }".into(),
        )],
        Sandbox::default(),
    );
    // Assigning a read-only property fails when the hook runs, naming the script.
    let rules = err.unwrap();
    let failure = run(&rules).unwrap_err();
    assert_eq!(failure.name, "bad.rhai");
}

#[test]
fn syntax_errors_are_located() {
    let errors = RuleSet::compile(
        &[(
            "rules/x.rhai".into(),
            "fn on_request(req) {\n  let = 3;\n}".into(),
        )],
        Sandbox::default(),
    )
    .unwrap_err();
    assert_eq!(errors[0].file, "rules/x.rhai");
    assert_eq!(errors[0].line, 2);
    assert!(
        errors[0].to_string().starts_with("rules/x.rhai:2:"),
        "{}",
        errors[0]
    );
    let errors = RuleSet::compile(
        &[("y.rhai".into(), "fn on_request(a, b) {}".into())],
        Sandbox::default(),
    )
    .unwrap_err();
    assert!(errors[0].message.contains("one parameter"));
    let errors = RuleSet::compile(
        &[("z.rhai".into(), "fn on_request(req) { eval(\"1\") }".into())],
        Sandbox::default(),
    )
    .unwrap_err();
    assert_eq!(errors[0].file, "z.rhai");
}

#[test]
fn runaway_scripts_fail_their_request_quickly() {
    let cases = [
        ("loop.rhai", "fn on_request(req) { loop { } }", "operations"),
        (
            "recurse.rhai",
            "fn f(x) { f(x + 1) } fn on_request(req) { f(0) }",
            "nested calls",
        ),
        (
            "string.rhai",
            "fn on_request(req) { let s = \"x\"; loop { s += s; } }",
            "exceeded its limit",
        ),
        (
            "type.rhai",
            "fn on_request(req) { let x = 1 + \"a\" * 2; }",
            "line",
        ),
    ];
    for (name, source, expect) in cases {
        let rules = compile(&[(name, source)]);
        let started = Instant::now();
        let failure = run(&rules).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{name} took {:?}",
            started.elapsed()
        );
        assert_eq!(failure.name, name);
        assert!(
            failure.to_string().contains(expect) || failure.message.contains(expect),
            "{name}: {failure}"
        );
        // Rhai reports the line of runtime errors; a breached limit has no single line.
        if name == "type.rhai" {
            assert!(failure.line > 0, "{name}: {failure:?}");
        }
    }
}

#[test]
fn the_wall_clock_deadline_stops_slow_operations() {
    let limits = Sandbox {
        max_operations: 0,
        deadline: Duration::from_millis(20),
        ..Sandbox::default()
    };
    let rules = RuleSet::compile(
        &[("slow.rhai".into(), "fn on_request(req) { loop { } }".into())],
        limits,
    )
    .unwrap();
    let started = Instant::now();
    let failure = rules.run(request(), Arc::new(NoLedger), None).unwrap_err();
    assert!(failure.message.contains("deadline"), "{failure}");
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[test]
fn the_deadline_stops_a_hook_spending_its_time_in_regex_helpers() {
    // Fewer than 512 operations (the operation count alone would start the clock and never look
    // at it again), each a regex built and run on a long string: the helpers look themselves.
    let script = r#"fn on_request(req) {
        let s = "a"; for i in 0..15 { s += s; }
        for i in 0..40 { let r = matches(s, "\\w{8}x" + i); }
    }"#;
    let limits = Sandbox {
        deadline: Duration::from_millis(20),
        ..Sandbox::default()
    };
    let rules = RuleSet::compile(&[("slow.rhai".into(), script.into())], limits).unwrap();
    let started = Instant::now();
    let failure = rules.run(request(), Arc::new(NoLedger), None).unwrap_err();
    assert!(failure.message.contains("deadline"), "{failure}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_regex_too_large_to_search_quickly_is_refused_in_one_line() {
    let script = r#"fn on_request(req) { let r = matches("abc", "\\w{100}x"); }"#;
    let rules =
        RuleSet::compile(&[("big.rhai".into(), script.into())], Sandbox::default()).unwrap();
    let failure = rules.run(request(), Arc::new(NoLedger), None).unwrap_err();
    assert!(failure.message.contains("size limit"), "{failure}");
    assert!(!failure.message.contains('\n'), "{failure}");
}

#[test]
fn one_regex_search_longer_than_the_deadline_fails_the_hook_after_it() {
    // One search, slow on this input (the pattern's automaton is large, the string long): it
    // cannot be interrupted, but the hook must not carry on as if it had kept its deadline.
    let script = r#"fn on_request(req) {
        let s = "abbabaab"; while s.len() < 32768 { s += s; }
        let found = matches(s, "[ab]*a[ab]{2000}c");
        req.tags.after = "yes";
    }"#;
    let limits = Sandbox {
        deadline: Duration::from_millis(1),
        ..Sandbox::default()
    };
    let rules = RuleSet::compile(&[("slow.rhai".into(), script.into())], limits).unwrap();
    let failure = rules.run(request(), Arc::new(NoLedger), None).unwrap_err();
    assert!(failure.message.contains("deadline"), "{failure}");
}

#[test]
fn parameters_a_script_leaves_alone_keep_their_exact_json() {
    let rules = compile(&[(
        "p.rhai",
        r#"fn on_request(req) { req.params.remove("temperature"); }"#,
    )]);
    let mut input = request();
    input
        .params
        .insert("big".into(), json!(12_345_678_901_234_567_890_u64));
    input
        .params
        .insert("nested".into(), json!({"a": [1, 2.5, null]}));
    let (out, _) = rules.run(input, Arc::new(NoLedger), None).unwrap();
    assert_eq!(out.params["big"], json!(12_345_678_901_234_567_890_u64));
    assert_eq!(out.params["nested"], json!({"a": [1, 2.5, null]}));
    assert!(!out.params.contains_key("temperature"));
}
