# Multi-stage build: compile in the Rust image, run from a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY tests ./tests
RUN cargo build --release --locked --bin llm-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 llm
COPY --from=build /src/target/release/llm-worker /usr/local/bin/llm-worker
COPY examples/fake.toml /etc/llm-worker/fake.toml
USER llm
ENTRYPOINT ["llm-worker"]
CMD ["run"]
