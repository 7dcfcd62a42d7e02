//! API keys: their format, their JSON shapes, and the service that verifies and
//! manages them.

pub mod api;
pub mod callback;
pub mod env_keys;
pub mod format;
pub mod jwt;
pub mod review;
pub mod service;

pub use service::{AuthFailure, Denied, KeyError, KeyService, RequestContext};
