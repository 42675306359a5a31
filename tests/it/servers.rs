//! Servers a test starts for itself as child processes on free loopback ports (never the
//! machine's own NATS or Postgres): killed when the handle is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Debian installs nats-server.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

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

/// A nats-server with JetStream, run from a configuration file of ours.
pub struct NatsServer {
    child: tokio::process::Child,
    pub port: u16,
    /// Its configuration file (a restart reads it again: same port, same store).
    file: PathBuf,
    /// Holds the configuration and the JetStream store; removed with the server.
    _dir: TempDir,
}

impl NatsServer {
    /// Start one with `config` added to `listen` and `jetstream` settings; `None` (with a
    /// message on stderr) where nats-server is not installed.
    pub async fn start(config: &str) -> Option<Self> {
        if !Path::new(NATS_SERVER).exists() {
            eprintln!("SKIPPED: {NATS_SERVER} is not installed");
            return None;
        }
        let dir = TempDir::new("llmw-nats");
        let port = free_port();
        let file = dir.path().join("nats-server.conf");
        let text = format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{config}",
            dir.path().join("js")
        );
        std::fs::write(&file, text).unwrap();
        let mut server = Self {
            child: spawn_nats(&file),
            port,
            file,
            _dir: dir,
        };
        server.wait_ready().await;
        Some(server)
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Start it again on the same port with the same JetStream store.
    pub async fn restart(&mut self) {
        self.child = spawn_nats(&self.file);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                panic!("nats-server exited ({status}): {err}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not listen within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn spawn_nats(config: &Path) -> tokio::process::Child {
    tokio::process::Command::new(NATS_SERVER)
        .arg("-c")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
