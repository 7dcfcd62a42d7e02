//! Prometheus metrics: requests by route and status, latency histograms by route,
//! authentication outcomes. Counters live in memory; `GET /metrics` renders them.
//! Labels are route templates and fixed reason words, never ids or credentials.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use sandgate_core::execute::RunStatus;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<HashMap<String, RouteStats>>,
    /// (outcome, reason) → count, but for `allowed`/`ok`: nearly every attempt is
    /// that one, counted in [`Metrics::allowed`] without a lock.
    auth: Mutex<HashMap<(&'static str, &'static str), u64>>,
    allowed: sandgate_core::shard::Counter,
    executions: Mutex<HashMap<&'static str, u64>>,
}

#[derive(Debug, Default)]
struct RouteStats {
    /// (method, status) → count.
    counts: Vec<(String, u16, u64)>,
    buckets: [u64; BUCKETS.len()],
    sum_seconds: f64,
    total: u64,
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let stats = match routes.get_mut(route) {
            Some(s) => s,
            None => routes.entry(route.to_owned()).or_default(),
        };
        match stats
            .counts
            .iter_mut()
            .find(|(m, s, _)| m == method && *s == status)
        {
            Some((_, _, n)) => *n += 1,
            None => stats.counts.push((method.to_owned(), status, 1)),
        }
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        stats.sum_seconds += secs;
        stats.total += 1;
    }

    pub fn observe_auth(&self, outcome: &'static str, reason: &'static str) {
        if (outcome, reason) == ("allowed", "ok") {
            self.allowed.add(1);
            return;
        }
        *self
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((outcome, reason))
            .or_default() += 1;
    }

    pub fn execution(&self, status: RunStatus) {
        let name = match status {
            RunStatus::Ok => "ok",
            RunStatus::Error => "error",
            RunStatus::Timeout => "timeout",
            RunStatus::MemoryLimit => "memory_limit",
            RunStatus::OutputLimit => "output_limit",
        };
        *self
            .executions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default() += 1;
    }

    /// The Prometheus text exposition of everything counted so far.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        out.push_str("# HELP sandgate_http_requests_total HTTP requests by route template, method and status.\n");
        out.push_str("# TYPE sandgate_http_requests_total counter\n");
        for route in &names {
            for (method, status, n) in &routes[*route].counts {
                let _ = writeln!(
                    out,
                    "sandgate_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                    escape(route)
                );
            }
        }
        out.push_str(
            "# HELP sandgate_http_request_duration_seconds Request latency by route template.\n",
        );
        out.push_str("# TYPE sandgate_http_request_duration_seconds histogram\n");
        for route in &names {
            let s = &routes[*route];
            let route = escape(route);
            for (bound, n) in BUCKETS.iter().zip(s.buckets) {
                let _ = writeln!(
                    out,
                    "sandgate_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "sandgate_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                s.total
            );
            let _ = writeln!(
                out,
                "sandgate_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                s.sum_seconds
            );
            let _ = writeln!(
                out,
                "sandgate_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                s.total
            );
        }
        drop(routes);
        out.push_str(
            "# HELP sandgate_auth_attempts_total Authentication attempts by outcome and reason.\n",
        );
        out.push_str("# TYPE sandgate_auth_attempts_total counter\n");
        let mut auth = self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let allowed = self.allowed.sum();
        if allowed > 0 {
            *auth.entry(("allowed", "ok")).or_default() += allowed;
        }
        let mut rows: Vec<_> = auth.iter().collect();
        rows.sort();
        for ((outcome, reason), n) in rows {
            let _ = writeln!(
                out,
                "sandgate_auth_attempts_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
            );
        }
        drop(auth);
        out.push_str("# HELP sandgate_executions_total Finished runs by status.\n");
        out.push_str("# TYPE sandgate_executions_total counter\n");
        let executions = self.executions.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = executions.iter().collect();
        rows.sort();
        for (status, n) in rows {
            let _ = writeln!(out, "sandgate_executions_total{{status=\"{status}\"}} {n}");
        }
        out
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.observe_request("GET", "/v1/keys", 200, Duration::from_millis(3));
        m.observe_request("GET", "/v1/keys", 200, Duration::from_millis(300));
        m.observe_auth("denied", "unknown_key");
        m.observe_auth("allowed", "ok");
        m.observe_auth("allowed", "ok");
        let text = m.render();
        assert!(text.contains("sandgate_auth_attempts_total{outcome=\"allowed\",reason=\"ok\"} 2"));
        assert!(text.contains(
            "sandgate_http_requests_total{method=\"GET\",route=\"/v1/keys\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "sandgate_http_request_duration_seconds_bucket{route=\"/v1/keys\",le=\"0.005\"} 1"
        ));
        assert!(
            text.contains(
                "sandgate_auth_attempts_total{outcome=\"denied\",reason=\"unknown_key\"} 1"
            )
        );
    }
}
