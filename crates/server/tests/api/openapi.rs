//! The OpenAPI document: generated from the route table, and snapshotted so an
//! accidental contract change fails here. Regenerate with `UPDATE_SNAPSHOTS=1`.

use sandgate_server::routes::{Access, table};
use serde_json::Value;

use crate::common::TestApp;

const SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/openapi.json");

#[test]
fn the_document_covers_every_route_and_matches_the_snapshot() {
    let app = TestApp::start();
    let r = app.get(None, "/openapi.json");
    assert_eq!(r.status.as_u16(), 200);
    let doc: Value = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for spec in table().specs() {
        let op = &doc["paths"][spec.path][spec.method.as_str().to_ascii_lowercase()];
        assert!(op.is_object(), "{} {} missing", spec.method, spec.path);
        match spec.access {
            Access::Scope(s) => assert_eq!(op["x-required-scope"], s.as_str()),
            Access::Public => assert_eq!(op["security"], serde_json::json!([])),
            Access::Authenticated => {
                assert!(op["security"].as_array().is_some_and(|a| !a.is_empty()))
            }
            Access::SandboxToken(scope) => {
                assert_eq!(
                    op["security"][0]["sandboxAccessToken"],
                    serde_json::json!([])
                );
                if let Some(s) = scope {
                    assert_eq!(op["x-required-scope"], s.as_str());
                }
            }
        }
    }
    assert!(doc["components"]["schemas"]["KeyView"].is_object());

    let pretty = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(SNAPSHOT).parent().unwrap()).unwrap();
        std::fs::write(SNAPSHOT, &pretty).unwrap();
    }
    let expected = std::fs::read_to_string(SNAPSHOT)
        .expect("snapshot missing: run with UPDATE_SNAPSHOTS=1 and review the file");
    assert!(
        expected == pretty,
        "the OpenAPI document changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and commit {SNAPSHOT}"
    );
}

#[test]
fn metrics_are_scoped_and_count_requests() {
    let app = TestApp::start();
    app.admin().whoami().unwrap();
    let r = app.get(Some(&app.admin_key), "/metrics");
    assert_eq!(r.status.as_u16(), 200);
    let text = r.text();
    assert!(
        text.contains(
            "sandgate_http_requests_total{method=\"GET\",route=\"/v1/auth/whoami\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(text.contains("sandgate_http_request_duration_seconds_bucket"));
    assert!(text.contains("sandgate_auth_attempts_total{outcome=\"allowed\""));
    assert!(!text.contains(&app.admin_key[12..]));
    let reader = app.key_with(&["sandbox:read"]);
    assert_eq!(app.get(Some(&reader), "/metrics").status.as_u16(), 403);
    assert_eq!(app.get(None, "/readyz").status.as_u16(), 200);
}
