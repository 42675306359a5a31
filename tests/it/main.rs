//! Integration tests: one binary, real NATS JetStream and Postgres, providers faked over HTTP.
//! Set `NATS_URL` and `DATABASE_URL` (see the README), or have Docker for testcontainers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

mod batch;
mod billing;
mod browser;
mod budgets;
mod cache;
mod cancel;
mod client;
mod cluster;
mod context;
mod dashboard;
mod deployments;
mod docs;
mod embed;
mod fairness;
mod faults;
mod fuzz_corpus;
mod gateway;
mod gateway_tenancy;
mod generate;
mod helpers;
mod history;
mod history_data;
mod images;
mod layering;
mod lifecycle;
mod metrics;
mod nats_auth;
mod poison;
mod probes;
mod providers;
mod rates;
mod reload;
mod rich;
mod security;
mod servers;
mod service;
mod startup;
mod tenants;
mod traces;
mod usage;
