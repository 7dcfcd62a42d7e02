//! Handlers, one module per resource. Each extracts, calls a service, maps the result.

pub mod audit;
pub mod execute;
pub mod keys;
pub mod meta;
pub mod ports;
pub mod sandboxes;
pub mod templates;
pub mod usage;
pub mod webhooks;
