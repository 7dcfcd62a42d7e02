//! The route policy, walked route by route through the live server.

use sandgate_client::Method;
use sandgate_core::scopes::Scope;
use sandgate_server::routes::{Access, table};
use serde_json::json;

use crate::common::{TestApp, assert_error};

fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "key_x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn every_route_demands_its_declared_scope() {
    // Every route is refused at least once here, from one address: the
    // throttle on failed authentications is not what this test is about.
    let app = TestApp::start_with(|c| c.auth_failure_limit = None);
    let table = table();
    assert!(table.specs().len() >= 12);
    for spec in table.specs() {
        let path = concrete(spec.path);
        let method = Method::from_bytes(spec.method.as_str().as_bytes()).unwrap();
        let anon = app
            .anonymous()
            .raw(method.clone(), &path, &[], None)
            .unwrap();
        match spec.access {
            Access::Public => {
                assert_eq!(
                    anon.status.as_u16(),
                    200,
                    "{} {path} is public",
                    spec.method
                );
                continue;
            }
            Access::SandboxToken(_) => {
                // No sandbox named, no token: refused like envd refuses
                // (the E2B tests open these routes with real tokens).
                assert_error(&anon, 401, "UNAUTHORIZED");
                let r = app
                    .client(&app.admin_key)
                    .raw(method, &path, &[], None)
                    .unwrap();
                assert_error(&r, 401, "UNAUTHORIZED");
                continue;
            }
            _ => assert_error(&anon, 401, "UNAUTHORIZED"),
        };
        let Access::Scope(needed) = spec.access else {
            let any = app.key_with(&["sandbox:read"]);
            let r = app.client(&any).raw(method, &path, &[], None).unwrap();
            assert!(
                r.status.is_success(),
                "{} {path}: {}",
                spec.method,
                r.text()
            );
            continue;
        };
        // Every scope but the one the route needs: still refused, and told which.
        let others: Vec<&str> = Scope::ALL
            .iter()
            .filter(|s| **s != needed)
            .map(|s| s.as_str())
            .collect();
        let (key, _) = app.create_key(json!({"name": "almost", "scopes": others}));
        let r = app
            .client(&key)
            .raw(method.clone(), &path, &[], None)
            .unwrap();
        let body = assert_error(&r, 403, "FORBIDDEN");
        assert_eq!(
            body["error"]["requiredScope"],
            needed.as_str(),
            "{} {path}",
            spec.method
        );
        // With the scope, the request gets past authorization.
        let (key, _) = app.create_key(json!({"name": "exact", "scopes": [needed.as_str()]}));
        let r = app.client(&key).raw(method, &path, &[], None).unwrap();
        assert!(
            ![401, 403].contains(&r.status.as_u16()),
            "{} {path} refused with its scope: {}",
            spec.method,
            r.text()
        );
    }
}
