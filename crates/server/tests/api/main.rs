//! The HTTP API, driven through a real server on port 0.

mod audit;
mod callback;
mod common;
mod containment;
mod e2b;
mod errors;
mod execute;
mod isolation;
mod jwt;
mod keys;
mod limits;
mod openapi;
mod policy;
mod refill;
mod sandboxes;
mod sources;
mod templates;
mod usage;
mod webhooks;
mod websocket;
