//! The delivery worker: claims due deliveries, POSTs them (blocking HTTP on tokio's
//! blocking pool, bounded in number and time), and records every attempt. A 2xx is
//! delivered; anything else is retried with exponential backoff until
//! `max_attempts`, then given up (the row keeps the last status and error).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::destination::GuardedResolver;
use super::signature::signature_header;
use crate::model::{DeliveryAttempt, DueDelivery, Timestamp};
use crate::store::WebhookStore;

/// How deliveries are attempted.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Delay before the first retry; doubled for each further one.
    pub base_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// Whole-request timeout of one attempt (connect, send, answer).
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Connect to loopback and private addresses too.
    pub allow_private: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            max_attempts: 8,
            timeout: Duration::from_secs(5),
            concurrency: 8,
            allow_private: false,
        }
    }
}

impl DeliveryConfig {
    /// The wait after attempt number `attempts` (1-based) failed.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Runs until aborted. `wake` is notified when deliveries are queued.
pub async fn run(store: Arc<dyn WebhookStore>, wake: Arc<Notify>, config: DeliveryConfig) {
    let agent = agent(&config);
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    // Also look for due retries this often when nothing wakes us.
    let poll = config
        .base_delay
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    // A claimed delivery is retried after this if its worker vanished (crash, restart).
    let lease = config.timeout.saturating_mul(2) + Duration::from_secs(5);
    loop {
        let free = slots.available_permits();
        if free > 0 {
            let now = Timestamp::now();
            let lease_until = now.plus_secs(lease.as_secs() as i64);
            match store.claim_due_deliveries(now, lease_until, free).await {
                Ok(due) => {
                    let claimed = due.len();
                    for delivery in due {
                        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                            return;
                        };
                        let (store, agent, config) =
                            (Arc::clone(&store), agent.clone(), config.clone());
                        let wake = Arc::clone(&wake);
                        tokio::spawn(async move {
                            attempt(&*store, agent, &config, delivery).await;
                            drop(permit);
                            // A slot is free: look for more work.
                            wake.notify_one();
                        });
                    }
                    if claimed == free {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read due webhook deliveries"),
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

fn agent(config: &DeliveryConfig) -> ureq::Agent {
    let ureq_config = ureq::Agent::config_builder()
        .timeout_global(Some(config.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .user_agent("sandgate-webhooks")
        .build();
    ureq::Agent::with_parts(
        ureq_config,
        ureq::unversioned::transport::DefaultConnector::default(),
        GuardedResolver::new(config.allow_private),
    )
}

async fn attempt(
    store: &dyn WebhookStore,
    agent: ureq::Agent,
    config: &DeliveryConfig,
    delivery: DueDelivery,
) {
    let id = delivery.id;
    let attempts = delivery.attempts + 1;
    let event_type = delivery.event_type.clone();
    let sent = tokio::task::spawn_blocking(move || send(&agent, &delivery))
        .await
        .unwrap_or_else(|e| Err(format!("delivery task failed: {e}")));
    let at = Timestamp::now();
    let (status, error) = match sent {
        Ok(status) if (200..300).contains(&status) => (Some(status), None),
        Ok(status) => (Some(status), Some(format!("receiver answered {status}"))),
        Err(e) => (None, Some(e)),
    };
    let delivered = error.is_none();
    let next_attempt_at = (!delivered && attempts < config.max_attempts)
        .then(|| Timestamp::from_millis(at.millis() + config.backoff(attempts).as_millis() as i64));
    match &error {
        None => tracing::debug!(delivery = id, event_type, attempts, "webhook delivered"),
        Some(e) if next_attempt_at.is_some() => {
            tracing::info!(delivery = id, event_type, attempts, error = %e, "webhook delivery failed; will retry");
        }
        Some(e) => {
            tracing::warn!(delivery = id, event_type, attempts, error = %e, "webhook delivery given up");
        }
    }
    let record = DeliveryAttempt {
        at,
        status,
        error,
        delivered,
        next_attempt_at,
    };
    if let Err(e) = store.record_attempt(id, &record).await {
        // The lease will expire and the delivery be retried: at least once.
        tracing::warn!(delivery = id, error = %e, "could not record a webhook attempt");
    }
}

/// One POST; the receiver's status, or why there was none (never the secret).
fn send(agent: &ureq::Agent, d: &DueDelivery) -> Result<u16, String> {
    let t = Timestamp::now().millis() / 1000;
    let signature = signature_header(d.secret.expose(), t, d.body.as_bytes());
    let response = agent
        .post(&d.url)
        .header("Content-Type", "application/json")
        .header("Sandgate-Signature", &signature)
        .header("Sandgate-Event-Id", &d.event_id)
        .header("Sandgate-Event-Type", &d.event_type)
        .send(d.body.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let config = DeliveryConfig {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            ..DeliveryConfig::default()
        };
        let delays: Vec<u64> = (1..=6).map(|n| config.backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(config.backoff(200), Duration::from_secs(10));
    }

    /// What a DNS answer changed after creation would meet: the resolver deliveries
    /// connect through refuses non-public addresses, so nothing connects.
    #[test]
    fn deliveries_never_connect_to_private_addresses_unless_allowed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let delivery = DueDelivery {
            id: 1,
            event_id: "evt_1".into(),
            event_type: "key.created".into(),
            body: "{}".into(),
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            secret: crate::keys::format::SecretKey::new("whsec_x".into()),
            attempts: 0,
        };
        let config = DeliveryConfig {
            timeout: Duration::from_secs(2),
            ..DeliveryConfig::default()
        };
        let err = send(&agent(&config), &delivery).unwrap_err();
        assert!(err.contains("non-public"), "{err}");
        assert!(listener.accept().is_err(), "a connection was made");

        // Allowed: the request reaches the listener (which never answers: timeout).
        let allowing = DeliveryConfig {
            allow_private: true,
            timeout: Duration::from_millis(300),
            ..DeliveryConfig::default()
        };
        assert!(send(&agent(&allowing), &delivery).is_err());
        assert!(listener.accept().is_ok(), "no connection was made");
    }
}
