//! sandgate's domain: keys and credentials, scopes, principals, audit, webhooks, and the
//! storage traits with their backends. No HTTP serving here: the server crate maps
//! these types onto routes and status codes (webhook delivery is the one outgoing
//! HTTP client).

pub mod audit;
pub mod execute;
pub mod keys;
pub mod limits;
pub mod model;
pub mod net;
pub mod principal;
pub mod processes;
pub mod quota;
pub mod request_id;
pub mod sandboxes;
pub mod scopes;
pub mod shard;
pub mod store;
pub mod templates;
pub mod usage;
mod warm;
pub mod webhooks;
