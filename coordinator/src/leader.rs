//! Which of several coordinators on one PostgreSQL database leads: a
//! leader row (`braid_leader`: term, holder, address, since) and a lease row
//! (`braid_lease`: expiry in the database's clock). A coordinator takes the
//! lease, with term + 1, only once it has expired; the leader renews it
//! every lease/5. They are two rows so that a renewal never waits for the
//! leader's own writes, which hold the term's row FOR SHARE, while a
//! takeover (which changes the term) does. Every write the leader makes checks
//! the row's term first (pgstore.rs, `fenced`), so a leader that was stopped
//! or cut off past its lease writes nothing: it finds the new term and exits
//! (its supervisor starts it again, as a follower).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The exit status of a coordinator that lost its leadership.
pub const EXIT_DEPOSED: i32 = 75;

/// What /metrics, /readyz and the dashboard show of leadership.
pub struct Leadership {
    pub leader: AtomicBool,
    pub term: AtomicI64,
    /// The leader's gRPC address as its lease row names it ("" when none lives).
    pub leader_address: Mutex<String>,
    /// "sqlite" or "postgres".
    pub store_kind: &'static str,
    /// Set when this coordinator stops: the lease is given up at once, so
    /// a follower need not wait for it to lapse.
    pub release: AtomicBool,
}

impl Leadership {
    /// The one coordinator of an embedded store: always the leader, term 0.
    pub fn alone(address: String) -> Arc<Leadership> {
        Arc::new(Leadership {
            leader: AtomicBool::new(true),
            term: AtomicI64::new(0),
            leader_address: Mutex::new(address),
            store_kind: "sqlite",
            release: AtomicBool::new(false),
        })
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    pub fn address(&self) -> String {
        self.leader_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Lines for /metrics.
    pub fn render(&self, out: &mut String, store_errors: u64, store_latency_us: u64) {
        let _ = writeln!(
            out,
            "# HELP braid_leader 1 when this coordinator leads.\n# TYPE braid_leader gauge\nbraid_leader {}",
            u8::from(self.is_leader())
        );
        let _ = writeln!(
            out,
            "# HELP braid_leader_term The term of the lease this coordinator last saw.\n# TYPE braid_leader_term gauge\nbraid_leader_term {}",
            self.term.load(Ordering::SeqCst)
        );
        let _ = writeln!(
            out,
            "# HELP braid_store_info The store's kind.\n# TYPE braid_store_info gauge\nbraid_store_info{{kind=\"{}\"}} 1",
            self.store_kind
        );
        let _ = writeln!(
            out,
            "# HELP braid_store_errors_total Store calls that failed.\n# TYPE braid_store_errors_total counter\nbraid_store_errors_total {store_errors}"
        );
        let _ = writeln!(
            out,
            "# HELP braid_store_latency_seconds The last store call's latency.\n# TYPE braid_store_latency_seconds gauge\nbraid_store_latency_seconds {:.6}",
            store_latency_us as f64 / 1e6
        );
    }

    /// The dashboard's and `/readyz`'s view.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "leader": self.is_leader(),
            "term": self.term.load(Ordering::SeqCst),
            "leader_address": self.address(),
            "store": self.store_kind,
        })
    }
}

impl Leadership {
    /// Gives up the lease (a stopping leader, after its last write) and
    /// waits up to `wait` for the lease thread to have done it.
    pub fn give_up(&self, wait: Duration) {
        self.release.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + wait;
        while self.is_leader() && self.store_kind == "postgres" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Exits at once: another coordinator leads with a newer term, so nothing
/// more may be written.
pub fn deposed(mine: i64, current: i64) -> ! {
    tracing::error!(term = mine, current, "no longer the leader: exiting without writing");
    std::process::exit(EXIT_DEPOSED)
}

/// Starts competing for the lease on a thread of its own; the receiver
/// turns to the term once this coordinator leads.
pub fn start(
    config: postgres::Config,
    address: String,
    lease: Duration,
) -> std::io::Result<(Arc<Leadership>, watch::Receiver<i64>)> {
    let state = Arc::new(Leadership {
        leader: AtomicBool::new(false),
        term: AtomicI64::new(0),
        leader_address: Mutex::new(String::new()),
        store_kind: "postgres",
        release: AtomicBool::new(false),
    });
    let (tx, rx) = watch::channel(0);
    let holder = format!("{}@{}", std::process::id(), address);
    let shared = state.clone();
    std::thread::Builder::new()
        .name("braid-lease".into())
        .spawn(move || Lease { config, holder, address, lease, state: shared, became: tx }.run())?;
    Ok((state, rx))
}

struct Lease {
    config: postgres::Config,
    holder: String,
    address: String,
    lease: Duration,
    state: Arc<Leadership>,
    became: watch::Sender<i64>,
}

impl Lease {
    fn run(self) {
        let mut client: Option<postgres::Client> = None;
        // When the last renewal that succeeded began.
        let mut renewed: Option<Instant> = None;
        let tick = (self.lease / 5).max(Duration::from_millis(200));
        loop {
            let term = self.state.term.load(Ordering::SeqCst);
            if self.state.release.load(Ordering::SeqCst) {
                if let (Some(c), Some(_)) = (client.as_mut(), renewed) {
                    match c.execute(
                        "UPDATE braid_lease SET expires = 'epoch' \
                         WHERE id = 1 AND (SELECT term FROM braid_leader WHERE id = 1) = $1",
                        &[&term],
                    ) {
                        Ok(_) => tracing::info!(term, "lease given up"),
                        Err(e) => tracing::warn!(error = %e, "giving up the lease failed; it lapses instead"),
                    }
                }
                self.state.leader.store(false, Ordering::SeqCst);
                return;
            }
            if let Some(at) = renewed
                && at.elapsed() > self.lease
            {
                // Stopped or cut off past the lease: another may lead now.
                deposed(term, -1);
            }
            let started = Instant::now();
            match self.step(&mut client, renewed.map(|_| term)) {
                Ok(Some(t)) => {
                    if renewed.is_none() {
                        tracing::info!(term = t, address = %self.address, "leading");
                        self.state.term.store(t, Ordering::SeqCst);
                        self.state.leader.store(true, Ordering::SeqCst);
                        *self.state.leader_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            self.address.clone();
                        let _ = self.became.send(t);
                    }
                    renewed = Some(started);
                }
                Ok(None) if renewed.is_some() => deposed(term, -1),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the lease could not be read or renewed");
                    client = None;
                }
            }
            std::thread::sleep(tick.saturating_sub(started.elapsed()));
        }
    }

    /// One try: renew `leading`'s lease, or take an expired one. Some(term)
    /// when this coordinator leads afterwards.
    fn step(
        &self,
        client: &mut Option<postgres::Client>,
        leading: Option<i64>,
    ) -> Result<Option<i64>, postgres::Error> {
        let c = match client {
            Some(c) if !c.is_closed() => c,
            _ => {
                let mut c = self.config.connect(postgres::NoTls)?;
                c.batch_execute("SET lock_timeout = '1s'")?;
                client.insert(c)
            }
        };
        let secs = self.lease.as_secs_f64();
        if let Some(term) = leading {
            let n = c.execute(
                "UPDATE braid_lease SET expires = clock_timestamp() + make_interval(secs => $2) \
                 WHERE id = 1 AND (SELECT term FROM braid_leader WHERE id = 1) = $1",
                &[&term, &secs],
            )?;
            return Ok((n == 1).then_some(term));
        }
        // Taking a lapsed lease: the lease row first (one taker wins), then
        // the term, which waits for any write of the old leader in flight.
        let mut tx = c.transaction()?;
        let lapsed = tx.execute(
            "UPDATE braid_lease SET expires = clock_timestamp() + make_interval(secs => $1) \
             WHERE id = 1 AND expires < clock_timestamp()",
            &[&secs],
        )?;
        if lapsed == 1 {
            let row = tx.query_one(
                "UPDATE braid_leader SET term = term + 1, holder = $1, address = $2, since = clock_timestamp() \
                 WHERE id = 1 RETURNING term",
                &[&self.holder, &self.address],
            )?;
            tx.commit()?;
            return Ok(Some(row.get(0)));
        }
        tx.rollback()?;
        let row = c.query_one(
            "SELECT l.term, l.address, s.expires > clock_timestamp() FROM braid_leader l, braid_lease s \
             WHERE l.id = 1 AND s.id = 1",
            &[],
        )?;
        let live: bool = row.get(2);
        self.state.term.store(row.get(0), Ordering::SeqCst);
        *self.state.leader_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            if live { row.get(1) } else { String::new() };
        Ok(None)
    }
}

/// Serves a follower's HTTP port (`/healthz`, `/readyz`, `/metrics`) until
/// this coordinator leads; returns its term, or None on SIGTERM/Ctrl-C.
/// A follower is ready (200) but says it follows, in the body and the
/// `x-braid-role` header, and names the leader in `x-braid-leader`.
pub async fn follow(
    http_addr: std::net::SocketAddr,
    state: Arc<Leadership>,
    mut became: watch::Receiver<i64>,
) -> std::io::Result<Option<i64>> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(http_addr).await?;
    let (ready, metrics) = (state.clone(), state.clone());
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let s = ready.clone();
                async move {
                    let leader = s.address();
                    let body = format!("ready: follower (leader {leader:?}, term {})\n", s.term.load(Ordering::SeqCst));
                    ([("x-braid-role", "follower".to_owned()), ("x-braid-leader", leader)], body)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let s = metrics.clone();
                async move {
                    let mut out = String::new();
                    s.render(&mut out, 0, 0);
                    out
                }
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let out = tokio::select! {
        changed = became.wait_for(|t| *t > 0) => changed.ok().map(|t| *t),
        () = braid_shared::telemetry::shutdown_signal() => None,
    };
    server.abort();
    let _ = server.await;
    Ok(out)
}
