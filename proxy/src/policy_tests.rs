//! A Service's resilience policy on real sockets: the in-process control plane of
//! `routes_tests` feeds snapshots carrying a `Policy`, and echo servers on loopback fail on
//! command.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use remora_api::discovery as api;
use remora_api::discovery::snapshot;

use crate::metrics::{ResilienceMetrics, RetryReason};
use crate::routes_tests::{
    ask, get, match_rule, prefix, request, rule, snapshot as routed, Client, Echo, Harness, BOTH,
};

/// The Service `shop/cart:80` over `endpoints`, without routes, under `policy`.
fn service(endpoints: &[&Echo], policy: api::Policy) -> api::Snapshot {
    api::Snapshot {
        kind: Some(snapshot::Kind::Service(api::Service {
            namespace: "shop".into(),
            name: "cart".into(),
            port: 80,
            app_protocol: "http".into(),
            endpoints: endpoints.iter().map(|echo| echo.endpoint()).collect(),
            policy: Some(policy),
            ..Default::default()
        })),
    }
}

/// The SPEC's defaults as the control plane fills them in, changed by `edit`.
fn policy(edit: impl FnOnce(&mut api::Policy, &mut api::RetryPolicy)) -> api::Policy {
    let mut retry = api::RetryPolicy {
        attempts: 2,
        budget_percent: 20,
        budget_floor_per_second: 10,
        ..Default::default()
    };
    let mut policy = api::Policy {
        failure_accrual_consecutive: 5,
        max_ejection_percent: 50,
        queue_size: 100,
        queue_timeout_ms: 3000,
        ..Default::default()
    };
    edit(&mut policy, &mut retry);
    policy.retry = Some(retry);
    policy
}

fn resilience(harness: &Harness) -> ResilienceMetrics {
    let discovery = harness.proxy.discovery.as_ref().unwrap();
    discovery.metrics().resilience("shop", "cart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_timeout_answers_504_and_a_route_timeout_wins() {
    let own = Echo::start("own").await;
    let harness = Harness::start(service(&[&own], policy(|p, _| p.timeout_ms = 300))).await;
    for client in BOTH {
        let fast = ask(&harness, client, get("/?delay=10")).await;
        assert_eq!(fast.status, StatusCode::OK, "{client:?}");
        let started = Instant::now();
        let slow = ask(&harness, client, get("/?delay=3000")).await;
        assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT, "{client:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{client:?}: {took:?}"
        );
    }

    // With routes: a rule's request timeout wins over the policy's; a rule without one has the
    // policy's.
    let v1 = Echo::start("v1").await;
    let mut long = rule("long", &[(0, 1)]);
    long.request_timeout_ms = 2000;
    let table = api::RouteTable {
        matches: vec![
            match_rule(0, prefix("/long")),
            match_rule(1, prefix("/plain")),
        ],
        rules: vec![long, rule("plain", &[(0, 1)])],
        backends: vec![v1.backend()],
    };
    let mut snapshot = routed(&own, table);
    if let Some(snapshot::Kind::Service(service)) = &mut snapshot.kind {
        service.policy = Some(policy(|p, _| p.timeout_ms = 300));
    }
    let harness = Harness::start(snapshot).await;
    for client in BOTH {
        let answer = ask(&harness, client, get("/long?delay=600")).await;
        assert_eq!(answer.status, StatusCode::OK, "{client:?}");
        let answer = ask(&harness, client, get("/plain?delay=600")).await;
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{client:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_nothing_is_retried() {
    let failing = Echo::start("failing").await;
    let mut snapshot = service(&[&failing], api::Policy::default());
    if let Some(snapshot::Kind::Service(service)) = &mut snapshot.kind {
        service.policy = None;
    }
    let harness = Harness::start(snapshot).await;
    for client in BOTH {
        failing.failing.store(1, Ordering::SeqCst);
        let answer = ask(&harness, client, get("/")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{client:?}");
    }
    assert_eq!(failing.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_retried_on_another_endpoint_for_idempotent_methods_only() {
    let (bad, good) = (Echo::start("bad").await, Echo::start("good").await);
    bad.failing.store(usize::MAX / 2, Ordering::SeqCst);
    // The bad endpoint answers at once, the good one slower: the balancer keeps drawing the bad
    // one first, so a retry that went back to it would come back 503 (one retry only).
    good.delay_ms.store(20, Ordering::SeqCst);
    let retried = policy(|_, retry| {
        retry.on_gateway_error = true;
        retry.attempts = 1;
    });
    let harness = Harness::start(service(&[&bad, &good], retried)).await;
    let metrics = resilience(&harness);
    for client in BOTH {
        bad.seen.lock().unwrap().clear();
        good.seen.lock().unwrap().clear();
        let before = metrics.retries(RetryReason::GatewayError);
        for _ in 0..20 {
            let answer = ask(&harness, client, get("/")).await;
            assert_eq!(answer.status, StatusCode::OK, "{client:?}");
            assert_eq!(answer.backend(), "good", "{client:?}");
        }
        assert_eq!(good.seen().len(), 20, "{client:?}");
        let retries = metrics.retries(RetryReason::GatewayError) - before;
        assert_eq!(retries, bad.seen().len() as u64, "{client:?}");
        // A POST is not retried: the bad endpoint's 503 is the client's.
        bad.seen.lock().unwrap().clear();
        let mut unanswered = 0;
        for _ in 0..20 {
            let answer = ask(&harness, client, request("POST", "/", &[], "body")).await;
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                unanswered += 1;
            }
        }
        assert_eq!(unanswered, bad.seen().len(), "{client:?}");
    }

    // Allowed for every method: the POST goes again, its body intact.
    let flaky = Echo::start("flaky").await;
    let all = policy(|_, retry| {
        retry.on_gateway_error = true;
        retry.non_idempotent = true;
    });
    let harness = Harness::start(service(&[&flaky], all)).await;
    for client in BOTH {
        flaky.seen.lock().unwrap().clear();
        flaky.failing.store(2, Ordering::SeqCst);
        let answer = ask(&harness, client, request("POST", "/", &[], "the body")).await;
        assert_eq!(answer.status, StatusCode::OK, "{client:?}");
        let seen = flaky.seen();
        assert_eq!(seen.len(), 3, "{client:?}");
        assert!(
            seen.iter()
                .all(|s| s.method == Method::POST && s.body == "the body"),
            "{client:?}"
        );
        // A body over the replay limit goes once.
        let big = "x".repeat(crate::serve::http::REPLAY_LIMIT + 1);
        flaky.seen.lock().unwrap().clear();
        flaky.failing.store(1, Ordering::SeqCst);
        let answer = ask(&harness, client, request("POST", "/", &[], &big)).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{client:?}");
        assert_eq!(flaky.seen().len(), 1, "{client:?}");
        assert_eq!(flaky.seen()[0].body.len(), big.len(), "{client:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_listed_codes_are_retried_as_the_policy_says() {
    let own = Echo::start("own").await;
    let retried = policy(|_, retry| {
        retry.on_reset = true;
        retry.status_codes = vec![429];
        retry.attempts = 1;
    });
    let harness = Harness::start(service(&[&own], retried)).await;
    for client in BOTH {
        // One endpoint: the retry goes to it again.
        own.seen.lock().unwrap().clear();
        let answer = ask(&harness, client, get("/?status=429")).await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{client:?}");
        assert_eq!(own.seen().len(), 2, "{client:?}: one retry");
        // 503 is not listed.
        own.failing.store(1, Ordering::SeqCst);
        let answer = ask(&harness, client, get("/")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{client:?}");
    }
    let metrics = resilience(&harness);
    assert_eq!(metrics.retries(RetryReason::Status), 2);

    // A connection closed after the request left: retried as a reset.
    let dropping = Echo::start("dropping").await;
    let harness = Harness::start(service(&[&dropping], policy(|_, r| r.on_reset = true))).await;
    for client in BOTH {
        dropping.dropping.store(1, Ordering::SeqCst);
        let answer = ask(&harness, client, get("/")).await;
        assert_eq!(answer.status, StatusCode::OK, "{client:?}: {answer:?}");
        assert_eq!(dropping.dropping.load(Ordering::SeqCst), 0, "{client:?}");
    }
    assert!(resilience(&harness).retries(RetryReason::Reset) >= 2);
}

/// One worker thread: the budget is per worker, so this test sees exactly one.
#[tokio::test(flavor = "current_thread")]
async fn the_budget_caps_retries_with_or_without_routes() {
    let failing = Echo::start("failing").await;
    failing.failing.store(usize::MAX / 2, Ordering::SeqCst);
    // No share of requests, a floor of 1/s: 10 retries in the window.
    let capped = policy(|_, retry| {
        retry.on_5xx = true;
        retry.budget_percent = 0;
        retry.budget_floor_per_second = 1;
    });
    let harness = Harness::start(service(&[&failing], capped.clone())).await;
    for _ in 0..30 {
        let answer = ask(&harness, crate::routes_tests::Client::Http1, get("/")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let metrics = resilience(&harness);
    assert_eq!(metrics.retries(RetryReason::Status5xx), 10);
    // 5 requests took 2 retries each; each of the other 25 asked for one and was refused.
    assert_eq!(metrics.budget_exhausted.get(), 25);
    assert_eq!(failing.seen().len(), 30 + 10);

    // A route's retry draws on the same budget.
    let own = Echo::start("own").await;
    let mut retried = rule("retried", &[(0, 1)]);
    retried.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 5,
        backoff_ms: 0,
    });
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![retried],
        backends: vec![failing.backend()],
    };
    let mut snapshot = routed(&own, table);
    if let Some(snapshot::Kind::Service(service)) = &mut snapshot.kind {
        service.name = "routed".into();
        service.policy = Some(capped);
    }
    let harness = Harness::start(snapshot).await;
    failing.seen.lock().unwrap().clear();
    for _ in 0..10 {
        let answer = ask(&harness, crate::routes_tests::Client::Http1, get("/")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let discovery = harness.proxy.discovery.as_ref().unwrap();
    let metrics = discovery.metrics().resilience("shop", "routed");
    assert_eq!(metrics.retries(RetryReason::Status), 10);
    assert_eq!(failing.seen().len(), 10 + 10);
}

/// One worker thread: failure accrual is per worker, so this test sees exactly one.
#[tokio::test(flavor = "current_thread")]
async fn an_endpoint_answering_gateway_errors_is_ejected_and_probed_back() {
    let (bad, one, two) = (
        Echo::start("bad").await,
        Echo::start("one").await,
        Echo::start("two").await,
    );
    bad.failing.store(usize::MAX / 2, Ordering::SeqCst);
    // No policy from the control plane: the defaults, consecutive=5 and 50 %.
    let mut snapshot = service(&[&bad, &one, &two], api::Policy::default());
    if let Some(snapshot::Kind::Service(service)) = &mut snapshot.kind {
        service.policy = None;
    }
    let harness = Harness::start(snapshot).await;
    let client = crate::routes_tests::Client::Http1;
    let mut errors = 0;
    for _ in 0..60 {
        let answer = ask(&harness, client, get("/")).await;
        errors += usize::from(answer.status != StatusCode::OK);
    }
    // Five failures eject it; at most a probe or two more while the 60 requests last.
    assert!((5..=8).contains(&errors), "{errors} errors");
    assert_eq!(errors, bad.seen().len());
    assert!(resilience(&harness).ejections.get() >= 1);

    // Recovered: a probe brings it back (within its backoff, at most 2 s by now), and it takes
    // its share again.
    bad.failing.store(0, Ordering::SeqCst);
    let before = bad.seen().len();
    let started = Instant::now();
    while bad.seen().len() < before + 5 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not back: {} more",
            bad.seen().len() - before
        );
        let answer = ask(&harness, client, get("/")).await;
        assert_eq!(answer.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One worker thread, as above.
#[tokio::test(flavor = "current_thread")]
async fn failure_accrual_never_ejects_more_than_the_share() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    a.failing.store(usize::MAX / 2, Ordering::SeqCst);
    b.failing.store(usize::MAX / 2, Ordering::SeqCst);
    let harness = Harness::start(service(
        &[&a, &b],
        policy(|p, _| p.failure_accrual_consecutive = 2),
    ))
    .await;
    let client = crate::routes_tests::Client::Http1;
    for _ in 0..40 {
        let answer = ask(&harness, client, get("/")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // 50 % of two: one ejected, the other takes every request after that.
    let (a, b) = (a.seen().len(), b.seen().len());
    assert!(a.min(b) <= 4, "a {a}, b {b}");
    assert!(resilience(&harness).ejections.get() >= 1);
}

/// One worker thread: the queue is per worker, so this test sees exactly one.
#[tokio::test(flavor = "current_thread")]
async fn requests_wait_in_the_queue_for_a_ready_endpoint_and_beyond_it_get_503_at_once() {
    let own = Echo::start("own").await;
    let queued = policy(|p, _| {
        p.queue_size = 2;
        p.queue_timeout_ms = 800;
    });
    let harness = Harness::start(service(&[], queued.clone())).await;
    let client = crate::routes_tests::Client::Http1;
    // An endpoint becomes ready while the request waits: it is served.
    let started = Instant::now();
    let (answer, ()) = tokio::join!(ask(&harness, client, get("/")), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        harness.feed.send_replace(service(&[&own], queued.clone()));
    });
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    let metrics = resilience(&harness);
    assert_eq!(metrics.queue_rejections.get(), 0);

    // None ready again: two wait and get 503 when the wait runs out, the others at once.
    harness.feed.send_replace(service(&[], queued));
    // Time for the snapshot to reach the proxy (no request may see it before).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let one = |_| async {
        let answer = ask(&harness, client, get("/")).await;
        (answer.status, started.elapsed())
    };
    let answers = futures_util::future::join_all((0..5).map(one)).await;
    let mut fast = 0;
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
        if *took < Duration::from_millis(400) {
            fast += 1;
        } else {
            assert!(*took < Duration::from_secs(2), "{took:?}");
        }
    }
    assert_eq!(fast, 3, "{answers:?}");
    assert_eq!(metrics.queue_rejections.get(), 5);
}

/// One worker thread, as above.
#[tokio::test(flavor = "current_thread")]
async fn a_route_backend_accrues_failures_under_its_own_policy() {
    let (own, bad, good) = (
        Echo::start("own").await,
        Echo::start("bad").await,
        Echo::start("good").await,
    );
    bad.failing.store(usize::MAX / 2, Ordering::SeqCst);
    let mut backend = good.backend();
    backend.name = "pool".into();
    backend.endpoints = vec![bad.endpoint(), good.endpoint()];
    backend.policy = Some(policy(|p, _| p.failure_accrual_consecutive = 2));
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![rule("all", &[(0, 1)])],
        backends: vec![backend],
    };
    // The parent Service's own accrual is off: only the backend's policy can eject.
    let mut snapshot = routed(&own, table);
    if let Some(snapshot::Kind::Service(service)) = &mut snapshot.kind {
        service.policy = Some(policy(|p, _| p.failure_accrual_consecutive = 0));
    }
    let harness = Harness::start(snapshot).await;
    let client = crate::routes_tests::Client::Http1;
    let mut errors = 0;
    for _ in 0..40 {
        let answer = ask(&harness, client, get("/")).await;
        errors += usize::from(answer.status != StatusCode::OK);
    }
    assert!((2..=4).contains(&errors), "{errors} errors");
    let discovery = harness.proxy.discovery.as_ref().unwrap();
    let pool = discovery.metrics().resilience("shop", "pool");
    assert!(pool.ejections.get() >= 1);
    assert_eq!(resilience(&harness).ejections.get(), 0);
}

/// One worker thread: the access log is captured on this thread.
#[tokio::test(flavor = "current_thread")]
async fn the_access_log_says_how_many_tries_a_request_took() {
    let (lines, _guard) = crate::http2_tests::capture_access_log();
    let own = Echo::start("own").await;
    let retried = policy(|_, retry| retry.on_5xx = true);
    let harness = Harness::start_with(service(&[&own], retried), |proxy| {
        proxy.access_log = true;
    })
    .await;
    let client = crate::routes_tests::Client::Http1;
    own.failing.store(2, Ordering::SeqCst);
    let answer = ask(&harness, client, get("/retried")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = ask(&harness, client, get("/once")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
    let line = |path: &str| {
        text.lines()
            .find(|line| line.contains(&format!("path={path} ")))
            .unwrap_or_else(|| panic!("no line for {path} in {text}"))
            .to_string()
    };
    assert!(line("/retried").contains("tries=3"), "{text}");
    assert!(line("/once").contains("tries=1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_backend_endpoint_that_refuses_is_skipped_without_any_retry_policy() {
    // No retry anywhere: the connect failure is the always-safe kind, tried on the backend's
    // other endpoint (the path a routed request with nothing to replay takes).
    let (own, good) = (Echo::start("own").await, Echo::start("good").await);
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut backend = good.backend();
    backend.name = "pool".into();
    backend.endpoints = vec![
        api::Endpoint {
            ip: refused.ip().to_string(),
            port: u32::from(refused.port()),
            ..Default::default()
        },
        good.endpoint(),
    ];
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![rule("all", &[(0, 1)])],
        backends: vec![backend],
    };
    let harness = Harness::start(routed(&own, table)).await;
    for client in BOTH {
        for n in 0..20 {
            let answer = ask(&harness, client, get(&format!("/try-{n}"))).await;
            assert_eq!(answer.status, StatusCode::OK, "{client:?} request {n}");
        }
    }
    assert_eq!(good.seen().len(), 40);
    assert!(
        own.seen().is_empty(),
        "the route sent to the Service's own endpoint"
    );
    assert!(resilience(&harness).retries(RetryReason::Connect) >= 1);
}

/// One rule for every path, to a backend whose one endpoint is `endpoint`.
fn all_to(own: &Echo, endpoint: std::net::SocketAddr) -> api::RouteTable {
    let mut backend = own.backend();
    backend.name = "refusing".into();
    backend.endpoints = vec![api::Endpoint {
        ip: endpoint.ip().to_string(),
        port: u32::from(endpoint.port()),
        ..Default::default()
    }];
    api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![rule("all", &[(0, 1)])],
        backends: vec![backend],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_h2_stream_the_upstream_refuses_goes_again_without_any_retry_policy() {
    // `REFUSED_STREAM` says the request reached no application: a bodyless one goes again, at
    // most twice, with no retry anywhere (the path a routed request with nothing to replay
    // takes), as it does without routes.
    let own = Echo::start("own").await;
    let (twice, streams) = crate::http2_tests::refusing(2).await;
    let harness = Harness::start(routed(&own, all_to(&own, twice))).await;
    let answer = ask(&harness, Client::H2, get("/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(&answer.body[..], b"answered");
    assert_eq!(streams.load(Ordering::SeqCst), 3);
    assert_eq!(resilience(&harness).retries(RetryReason::Connect), 2);

    let (always, streams) = crate::http2_tests::refusing(usize::MAX).await;
    let harness = Harness::start(routed(&own, all_to(&own, always))).await;
    let answer = ask(&harness, Client::H2, get("/")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        streams.load(Ordering::SeqCst),
        3,
        "sent more than twice again"
    );
    assert!(
        own.seen().is_empty(),
        "the route sent to the Service's own endpoint"
    );
}

/// One worker thread: the access log is captured on this thread.
#[tokio::test(flavor = "current_thread")]
async fn the_access_log_counts_each_send_of_a_refused_routed_h2_stream_as_a_try() {
    let (lines, _guard) = crate::http2_tests::capture_access_log();
    let own = Echo::start("own").await;
    let (twice, _) = crate::http2_tests::refusing(2).await;
    let harness = Harness::start_with(routed(&own, all_to(&own, twice)), |proxy| {
        proxy.access_log = true;
    })
    .await;
    let answer = ask(&harness, Client::H2, get("/refused-twice")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("path=/refused-twice "))
        .unwrap_or_else(|| panic!("no line for the request in {text}"));
    assert!(line.contains("tries=3"), "{line}");
}
