//! The server under test, shared by the benchmarks: a real sandgate on its own
//! thread and runtime, as `sandgate serve` runs it (a multi-threaded runtime with
//! one worker per CPU), on 127.0.0.1 port 0 with a temporary data dir.

use std::net::SocketAddr;
use std::thread::JoinHandle;

use sandgate_server::{AppState, ServerConfig};

#[derive(Debug)]
pub struct Server {
    pub url: String,
    #[allow(dead_code, reason = "each benchmark uses part of the shared server")]
    pub addr: SocketAddr,
    pub admin_key: String,
    _dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Server {
    /// Starts a server whose configuration `tweak` may change.
    pub fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::new(dir.path());
        tweak(&mut config);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let state = AppState::open(config).await.expect("open state");
                let admin = state
                    .keys()
                    .bootstrap_admin()
                    .await
                    .expect("bootstrap")
                    .expect("an empty store gets an admin key");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("local addr");
                ready_tx.send((addr, admin.secret)).expect("report ready");
                let shutdown = async {
                    let _ = stopped.await;
                };
                sandgate_server::run(listener, state, shutdown)
                    .await
                    .expect("serve");
            });
        });
        let (addr, admin_key) = ready_rx.recv().expect("server started");
        Server {
            url: format!("http://{addr}"),
            addr,
            admin_key,
            _dir: dir,
            stop,
            thread,
        }
    }

    /// Graceful shutdown: the server writes its pending audit rows and counters.
    pub fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("server thread");
    }
}
