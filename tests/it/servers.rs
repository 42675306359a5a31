//! Servers a test starts for itself as child processes on free loopback ports (never the
//! machine's own NATS or Postgres): killed when the handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server of the test's own (`llm_worker_testkit::nats`), panicking on failures.
pub struct NatsServer(pub llm_worker_testkit::nats::NatsServer);

impl NatsServer {
    /// Start one with `config` added to `listen` and `jetstream` settings. Fails the test
    /// where nats-server is not installed: a fault test that cannot make its fault must not
    /// pass.
    pub async fn start(config: &str) -> Self {
        let server = llm_worker_testkit::nats::NatsServer::start(config)
            .await
            .unwrap();
        Self(server.unwrap_or_else(missing))
    }

    /// Three routed nodes (`n0`..`n2`).
    pub async fn cluster() -> Vec<Self> {
        Self::planned(llm_worker_testkit::nats::ClusterPlan::new().unwrap()).await
    }

    /// The three nodes of `plan`, on the ports it chose.
    pub async fn planned(plan: llm_worker_testkit::nats::ClusterPlan) -> Vec<Self> {
        let nodes = plan.start().await.unwrap().unwrap_or_else(missing);
        nodes.into_iter().map(Self).collect()
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        self.0.kill().await;
    }

    /// Start it again on the same port with the same JetStream store.
    pub async fn restart(&mut self) {
        self.0.restart().await.unwrap();
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }
}

/// A TCP proxy to Postgres that can be made unreachable (connections cut and refused).
pub struct Outage {
    pub port: u16,
    up: watch::Sender<bool>,
}

impl Outage {
    pub async fn start(upstream: String) -> Arc<Outage> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, _) = watch::channel(true);
        let outage = Arc::new(Outage { port, up });
        let o = outage.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut up = o.up.subscribe();
                if !*up.borrow() {
                    continue; // refused: dropped at once
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up.wait_for(|up| !*up) => {} // cut
                    }
                });
            }
        });
        outage
    }

    /// A proxy in front of the test's database: the proxy and the database URL through it.
    pub async fn for_database(app: &crate::helpers::TestApp) -> (Arc<Outage>, String) {
        let real = url_host_port(&app.services.database_url);
        let outage = Outage::start(real.clone()).await;
        let proxied = app
            .database
            .url
            .replacen(&real, &format!("127.0.0.1:{}", outage.port), 1);
        (outage, proxied)
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

fn missing<T>() -> T {
    panic!(
        "{} is not installed: this test starts its own NATS servers (apt install nats-server)",
        llm_worker_testkit::nats::NATS_SERVER
    )
}

fn url_host_port(url: &str) -> String {
    let after = url
        .split_once('@')
        .map_or_else(|| url.split_once("://").unwrap().1, |(_, r)| r);
    after.split(['/', '?']).next().unwrap().to_string()
}
