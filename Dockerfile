# Multi-stage build: compile in the Rust image, run from a slim Debian. The last stage is the
# worker; `fake-llm-server` (the test kit's fake LLM API, for the compose demo) is its own
# stage and never part of the worker image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# Build settings: mimalloc's arenas committed as used (see the file).
COPY .cargo ./.cargo
COPY src ./src
COPY crates ./crates
COPY migrations ./migrations
COPY tests ./tests
COPY examples ./examples
RUN cargo build --release --locked -p llm-worker --bin llm-worker \
    && cargo build --release --locked -p llm-worker-testkit --bin fake-llm-server

FROM debian:bookworm-slim AS fake-llm-server
COPY --from=build /src/target/release/fake-llm-server /usr/local/bin/fake-llm-server
USER 10001
ENTRYPOINT ["fake-llm-server", "--listen", "0.0.0.0:8089"]

FROM debian:bookworm-slim AS worker
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 llm
COPY --from=build /src/target/release/llm-worker /usr/local/bin/llm-worker
COPY examples/demo.toml /etc/llm-worker/demo.toml
# The compose demo reaches the fake LLM API as the `fake-llm` service.
RUN sed 's#127.0.0.1:8089#fake-llm:8089#' /etc/llm-worker/demo.toml > /etc/llm-worker/demo-compose.toml
USER llm
ENTRYPOINT ["llm-worker"]
CMD ["run"]
