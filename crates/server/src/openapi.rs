//! The OpenAPI 3.1 document, generated from the route table and the request and
//! response types' JSON Schemas: written by the code, never by hand.

use schemars::SchemaGenerator;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::routes::{Access, Body, RouteSpec};

pub fn document(specs: &[RouteSpec]) -> Value {
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "#/components/schemas/".into();
    });
    let mut generator = SchemaGenerator::new(settings);
    let mut paths = Map::new();
    for spec in specs {
        let op = operation(spec, &mut generator);
        let item = paths
            .entry(spec.path.to_owned())
            .or_insert_with(|| json!({}));
        item[spec.method.as_str().to_ascii_lowercase()] = op;
    }
    let mut schemas: Map<String, Value> = generator.definitions().clone();
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message", "requestId"],
                "properties": {
                    "code": {"type": "string", "enum": [
                        "INVALID_REQUEST", "UNAUTHORIZED", "KEY_EXPIRED", "FORBIDDEN",
                        "IP_NOT_ALLOWED", "NOT_FOUND", "CONFLICT", "PAYLOAD_TOO_LARGE",
                        "RATE_LIMITED", "QUOTA_EXCEEDED", "AUTH_CALLBACK_FAILED", "INTERNAL"]},
                    "message": {"type": "string"},
                    "requestId": {"type": "string"},
                    "field": {"type": "string"},
                    "requiredScope": {"type": "string"}
                }
            }}
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sandgate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Run untrusted code in isolated sandboxes, guarded by API-key authentication and authorization."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "sandboxAccessToken": {
                    "type": "apiKey", "in": "header", "name": "X-Access-Token",
                    "description": "The sandbox's access token (E2B envd routes), with the sandbox named in E2b-Sandbox-Id; the sandbox owner's key must hold the route's scope"
                }
            }
        }
    })
}

fn operation(spec: &RouteSpec, generator: &mut SchemaGenerator) -> Value {
    let mut op = json!({
        "operationId": spec.operation_id,
        "summary": spec.summary,
    });
    let mut parameters: Vec<Value> = path_params(spec.path)
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    parameters.extend(spec.query.iter().map(|(name, description)| {
        json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}})
    }));
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    match spec.access {
        Access::Public => op["security"] = json!([]),
        Access::Authenticated => {
            op["security"] = json!([{"bearerAuth": []}, {"apiKeyAuth": []}]);
        }
        Access::Scope(scope) => {
            op["security"] = json!([{"bearerAuth": []}, {"apiKeyAuth": []}]);
            op["x-required-scope"] = json!(scope.as_str());
        }
        Access::SandboxToken(scope) => {
            op["security"] = json!([{"sandboxAccessToken": []}]);
            if let Some(scope) = scope {
                op["x-required-scope"] = json!(scope.as_str());
            }
        }
    }
    if let Some(body) = spec.request {
        op["requestBody"] = json!({"required": false, "content": content(body, generator)});
    }
    let mut responses = Map::new();
    let success = match spec.response {
        Body::Empty => json!({"description": "done"}),
        body => json!({"description": "success", "content": content(body, generator)}),
    };
    responses.insert(spec.status.to_string(), success);
    let error = json!({
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let mut codes: Vec<&str> = vec!["500"];
    if spec.access != Access::Public {
        codes.extend(["401", "403", "429"]);
    }
    if spec.request.is_some() || !spec.query.is_empty() {
        codes.extend(["400", "413"]);
    }
    if spec.path.contains('{') {
        codes.push("404");
    }
    if spec.operation_id == "updateKey" || spec.operation_id == "rotateKey" {
        codes.push("409");
    }
    codes.sort_unstable();
    for code in codes {
        responses.insert(code.to_owned(), error.clone());
    }
    op["responses"] = Value::Object(responses);
    op
}

fn content(body: Body, generator: &mut SchemaGenerator) -> Value {
    match body {
        Body::Json(schema) => {
            json!({"application/json": {"schema": schema(generator).to_value()}})
        }
        Body::Text(content_type) => json!({ content_type: {"schema": {"type": "string"}} }),
        Body::Empty => json!({}),
    }
}

fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}
