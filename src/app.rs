//! Starting and stopping a worker process: connections, streams, consumers, the recorder,
//! and the shutdown sequence.
//!
//! Shutdown (one design): the stop token fires (SIGTERM/SIGINT in `main`) -> pull loops stop
//! and hand back undispatched messages -> in-flight jobs get `shutdown_grace_secs` to finish ->
//! stragglers are handed back (Nak) for another worker -> the recorder flushes -> return.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::contract::JobKind;
use crate::dead::DeadLetters;
use crate::health::Health;
use crate::pricing::PriceBook;
use crate::queue::{self, PullLoop};
use crate::reload::{ConfigSource, Reloader};
use crate::reply::Replies;
use crate::startup::{Phase, Progress, Startup};
use crate::status;
use crate::usage;
use crate::worker::{Routing, Worker};

/// What this process runs.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    /// Consume and answer jobs.
    pub jobs: bool,
    /// Project results into Postgres (needs a database URL).
    pub recorder: bool,
}

/// A started worker process; stop it with [`Running::shutdown`].
pub struct Running {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// The tasks of the jobs in flight.
    jobs: TaskTracker,
    pub worker_id: String,
    reloader: Option<Reloader>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`telemetry.metrics_listen`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Running {
    /// Re-read the configuration and apply what can change while running (see
    /// [`crate::reload`]); `None` when this process answers no jobs or has no source.
    pub fn reloader(&self) -> Option<Reloader> {
        self.reloader.clone()
    }

    /// Gives the memory each burst of jobs freed back to the system once the burst is over
    /// (see `memory`), until shutdown. Process-wide (the allocator's arenas are the
    /// process's), so the `llm-worker` binary turns it on and a program that embeds a worker
    /// decides for itself.
    pub fn release_memory_after_bursts(&self) {
        tokio::spawn(crate::memory::release_after_bursts(
            self.jobs.clone(),
            self.stop.clone(),
        ));
    }

    /// Begin a graceful shutdown and wait for it to complete.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// A token that, when cancelled, starts the graceful shutdown.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Wait until the process has stopped (after the stop token fired).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Start everything `roles` asks for and return once the process is ready (streams and
/// consumers exist, migrations applied).
pub async fn start(config: Config, roles: Roles) -> anyhow::Result<Running> {
    start_with(config, roles, None).await
}

/// [`start`], reloadable from `reload` (SIGHUP through [`Running::reloader`], and requests on
/// `<prefix>.control.reload`) when given.
pub async fn start_with(
    config: Config,
    roles: Roles,
    reload: Option<ConfigSource>,
) -> anyhow::Result<Running> {
    let mut reload_handle: Option<Reloader> = None;
    if roles.jobs {
        config.require_providers()?;
    }
    let mut config = config;
    let progress = Progress::default();
    let startup = Startup::new(
        Duration::from_secs(config.nats.start_timeout_secs),
        progress.clone(),
    );
    let client = crate::nats::connect_worker(&config.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let earlier = startup
        .step("the deployment's stream names", || {
            crate::nats::earlier_names(&js, &config.nats)
        })
        .await?;
    if earlier {
        crate::nats::use_earlier_names(&mut config.nats);
    }
    let config = Arc::new(config);
    let nats_cfg = Arc::new(config.nats.clone());
    let prices = PriceBook::default();
    let health = Health::new(&config.circuit_breaker);
    let stop = CancellationToken::new();
    let abandon = CancellationToken::new();
    let tracker = TaskTracker::new();
    let background = TaskTracker::new();
    let pool = usage::lazy_pool(&config)?;
    let recording = roles.recorder && config.recorder.enabled;
    let metrics = crate::metrics::Metrics::new(config.telemetry.metrics_tenant_label);

    // Served from the start, so `/readyz` says what start-up waits for.
    let metrics_addr = match &config.telemetry.metrics_listen {
        Some(listen) => Some(
            crate::metrics::server::serve(
                listen,
                crate::metrics::server::Probe {
                    metrics: metrics.clone(),
                    client: client.clone(),
                    js: js.clone(),
                    nats: nats_cfg.clone(),
                    progress: progress.clone(),
                    recorder: recording && pool.is_some(),
                    health: health.clone(),
                    tracker: tracker.clone(),
                    stop: stop.clone(),
                },
            )
            .await
            .with_context(|| format!("serving metrics on {listen}"))?,
        ),
        None => None,
    };
    startup
        .step("the deployment's streams", || {
            crate::nats::ensure_streams(&js, &nats_cfg)
        })
        .await?;

    // Postgres is never required to answer jobs: with the database down at start, the worker
    // serves jobs at once and the recorder (results wait in JetStream) and prices catch up when
    // it is back.
    if let Some(pool) = &pool {
        let ready = tokio::time::timeout(Duration::from_secs(5), async {
            usage::migrate(pool).await?;
            usage::load_prices(pool, &prices).await?;
            Ok::<_, anyhow::Error>(())
        })
        .await;
        let ready = match ready {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "database not ready; retrying in the background");
                false
            }
            Err(_) => {
                tracing::warn!("database not ready within 5 s; retrying in the background");
                false
            }
        };
        let recorder = if recording {
            let dead = DeadLetters::new(js.clone(), nats_cfg.clone());
            let recorder = startup
                .step("the recorder's consumer", || {
                    usage::Recorder::start(
                        &js,
                        &nats_cfg,
                        pool.clone(),
                        dead.clone(),
                        &config.recorder,
                    )
                })
                .await?;
            Some(recorder)
        } else {
            None
        };
        background.spawn(usage::maintain(
            pool.clone(),
            prices.clone(),
            recorder,
            ready,
            config.tenants.clone(),
            stop.clone(),
        ));
    } else if roles.recorder {
        tracing::warn!(
            "no DATABASE_URL: usage is not recorded by this process (results stay in the results stream)"
        );
    }

    let mut loops = Vec::new();
    let mut consumed = Vec::new();
    if roles.jobs {
        let (routing, no_embedding) = Routing::from_config(&config, &health, &prices)?;
        let replies = Replies::new(
            client.clone(),
            js.clone(),
            nats_cfg.clone(),
            Duration::from_millis(config.limits.chunk_interval_ms),
        );
        if let Some(why) = no_embedding {
            tracing::warn!(%why, "embedding jobs are not consumed");
        }
        let mut kinds = vec![JobKind::Generate];
        if routing.embeds() {
            kinds.push(JobKind::Embed);
        }
        let makes_images = routing.makes_images();
        if makes_images {
            kinds.push(JobKind::Image);
        }
        let dead = DeadLetters::new(js.clone(), nats_cfg.clone());
        let outbox = crate::worker::NatsOutbox { replies, dead };
        let ledger = startup
            .step(
                &format!("the tenant bucket {}", nats_cfg.tenant_bucket),
                || crate::policy::Ledger::start(&js, client.clone(), &nats_cfg, config.worker_id()),
            )
            .await?;
        let mut worker = Worker::new(&config, routing, outbox, prices.clone())?
            .with_ledger(ledger)
            .with_metrics(metrics.clone());
        if makes_images {
            let store = startup
                .step(
                    &format!("the picture bucket {}", nats_cfg.images_bucket),
                    || crate::image_store::ImageStore::open(&js, &nats_cfg),
                )
                .await?;
            worker = worker.with_images(store);
        }
        consumed.clone_from(&kinds);
        // The batch lane: its stream and bucket, where this worker hands batch jobs over.
        let (held_stream, batch_kv) = startup
            .step(
                &format!("the batch stream {}", nats_cfg.batch_stream),
                || crate::lane::ensure(&js, &nats_cfg),
            )
            .await?;
        worker = worker.with_lane(crate::lane::Intake::new(js.clone(), &nats_cfg));
        if config.cache.enabled {
            let cache = startup
                .step(
                    &format!("the cache bucket {}", nats_cfg.cache_bucket),
                    || {
                        crate::cache::Cache::open(
                            &js,
                            &nats_cfg.cache_bucket,
                            &config.cache,
                            nats_cfg.replicas,
                        )
                    },
                )
                .await?;
            worker = worker.with_cache(cache);
        }
        if let Some(source) = reload {
            let reloader = Reloader {
                source,
                current: Arc::new(std::sync::Mutex::new((*config).clone())),
                worker: worker.clone(),
                health: health.clone(),
                prices: prices.clone(),
                pool: pool.clone(),
            };
            background.spawn(crate::reload::serve(
                client.clone(),
                format!("{}.control.reload", nats_cfg.subject_prefix),
                config.worker_id(),
                reloader.clone(),
                nats_cfg.reply_policy().map_err(anyhow::Error::msg)?,
                stop.clone(),
            ));
            reload_handle = Some(reloader);
        }
        background.spawn(crate::worker::probe::run(
            worker.clone(),
            config.health.clone(),
            stop.clone(),
        ));
        let follower = startup
            .step(
                &format!("the cancel stream {}", nats_cfg.cancel_stream),
                || {
                    crate::cancel::follow(
                        js.clone(),
                        nats_cfg.clone(),
                        worker.cancels().clone(),
                        stop.clone(),
                    )
                },
            )
            .await?;
        background.spawn(async move {
            let _ = follower.await;
        });
        background.spawn(status::serve(
            client.clone(),
            status::subject(&nats_cfg),
            config.worker_id(),
            health.clone(),
            nats_cfg.reply_policy().map_err(anyhow::Error::msg)?,
            stop.clone(),
        ));
        background.spawn(crate::service::serve(
            client.clone(),
            (*nats_cfg).clone(),
            crate::service::Identity::new(&config.worker_id(), &nats_cfg, kinds.clone()),
            worker.stats().clone(),
            nats_cfg.reply_policy().map_err(anyhow::Error::msg)?,
            stop.clone(),
        ));
        let batch_consumer = startup
            .step(
                &format!("the batch consumer of {}", nats_cfg.batch_stream),
                || crate::batch::consumer(&js, &nats_cfg, &config.batch),
            )
            .await?;
        crate::batch::start(
            crate::batch::Parts {
                stream: held_stream,
                kv: batch_kv,
                worker: worker.clone(),
                worker_id: config.worker_id(),
                stop: stop.clone(),
                abandon: abandon.clone(),
            },
            batch_consumer,
            &config.batch,
            &background,
        );
        for kind in kinds {
            startup
                .step(
                    &format!("the job consumer {}", nats_cfg.consumer_name(kind)),
                    || queue::ensure_consumer(&js, &nats_cfg, kind, config.worker.max_deliver),
                )
                .await?;
            let pull = PullLoop {
                kind,
                max_deliver: config.worker.max_deliver,
                max_in_flight: config.worker.max_in_flight,
                fair_window: config.worker.fair_window,
                fair_window_bytes: config.worker.fair_window_bytes,
                progress_every: nats_cfg.ack_wait() / 3,
                pull_expires: Duration::from_millis(config.worker.pull_expires_ms),
                stop_pulling: stop.clone(),
                abandon: abandon.clone(),
                tracker: tracker.clone(),
            };
            loops.push(tokio::spawn(pull.run(
                js.clone(),
                nats_cfg.clone(),
                worker.clone(),
            )));
        }
    }

    progress.set(Phase::Ready(consumed));
    let grace = Duration::from_secs(config.worker.shutdown_grace_secs);
    let worker_id = config.worker_id();
    tracing::info!(
        worker_id,
        jobs = roles.jobs,
        recorder = recording && pool.is_some(),
        "worker ready"
    );
    let jobs = tracker.clone();
    let stop_wait = stop.clone();
    let done = tokio::spawn(async move {
        stop_wait.cancelled().await;
        tracing::info!("shutting down: no new jobs; waiting for in-flight jobs");
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("grace period over; handing in-flight jobs back");
            abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        }
        background.close();
        background.wait().await;
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "flushing NATS on shutdown failed");
        }
        tracing::info!("stopped");
    });
    Ok(Running {
        stop,
        done,
        jobs,
        worker_id,
        reloader: reload_handle,
        metrics_addr,
    })
}
