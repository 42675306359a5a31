//! nats-server child processes on free loopback ports, for tests and benchmarks that kill and
//! restart their own servers (never the machine's): one server, or a 3-node cluster with
//! JetStream on every node. Killed when dropped; their stores are removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Debian installs nats-server.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A nats-server with JetStream, run from a configuration file of ours.
pub struct NatsServer {
    child: tokio::process::Child,
    pub port: u16,
    /// Its configuration file (a restart reads it again: same port, same store).
    file: PathBuf,
    dir: PathBuf,
}

impl NatsServer {
    /// Start one with `config` added to its `listen` and `jetstream` settings. `Ok(None)`
    /// where nats-server is not installed.
    pub async fn start(config: &str) -> std::io::Result<Option<Self>> {
        Self::start_on(free_port()?, config).await
    }

    /// [`Self::start`] on `port`.
    pub async fn start_on(port: u16, config: &str) -> std::io::Result<Option<Self>> {
        if !Path::new(NATS_SERVER).exists() {
            return Ok(None);
        }
        let dir = std::env::temp_dir().join(format!("llmw-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("nats-server.conf");
        let text = format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{config}",
            dir.join("js")
        );
        std::fs::write(&file, text)?;
        let mut server = Self {
            child: spawn(&file)?,
            port,
            file,
            dir,
        };
        server.wait_ready().await?;
        Ok(Some(server))
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Start it again on the same port with the same JetStream store.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.child = spawn(&self.file)?;
        self.wait_ready().await
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(std::io::Error::other(format!(
                    "nats-server exited ({status}): {err}"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "nats-server did not listen within 15 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Three nats-servers routed to each other (server names `n0`, `n1`, `n2`), JetStream on
/// each. `Ok(None)` where nats-server is not installed.
pub async fn cluster() -> std::io::Result<Option<Vec<NatsServer>>> {
    ClusterPlan::new()?.start().await
}

/// The ports of a 3-node cluster chosen before it starts, so a client can be pointed at it
/// (and start connecting) before any node listens.
pub struct ClusterPlan {
    clients: [u16; 3],
    routes: [u16; 3],
}

impl ClusterPlan {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            clients: [free_port()?, free_port()?, free_port()?],
            routes: [free_port()?, free_port()?, free_port()?],
        })
    }

    /// The nodes' client URLs, comma separated (what `nats.url` takes).
    pub fn urls(&self) -> String {
        self.clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start the three nodes, each once the previous one listens.
    pub async fn start(self) -> std::io::Result<Option<Vec<NatsServer>>> {
        let all = self
            .routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, (client, route)) in self.clients.iter().zip(&self.routes).enumerate() {
            let config = format!(
                "server_name: n{i}\ncluster {{ name: llmw, listen: 127.0.0.1:{route}, routes: [{all}] }}\n"
            );
            match NatsServer::start_on(*client, &config).await? {
                Some(node) => nodes.push(node),
                None => return Ok(None),
            }
        }
        Ok(Some(nodes))
    }
}

/// The servers' URLs, comma separated (what `nats.url` takes).
pub fn urls(nodes: &[NatsServer]) -> String {
    nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",")
}

fn spawn(config: &Path) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(NATS_SERVER)
        .arg("-c")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
