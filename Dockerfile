# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY load-tests/Cargo.toml load-tests/Cargo.toml
COPY src src
COPY load-tests/src load-tests/src
COPY tests tests
COPY benches benches
RUN cargo build --release --locked --bin flagstream

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/flagstream --create-home flagstream
COPY --from=build /src/target/release/flagstream /usr/local/bin/flagstream
COPY flags /etc/flagstream/flags
COPY queries /etc/flagstream/queries
USER flagstream
WORKDIR /var/lib/flagstream
ENV FLAGSTREAM_DATA_DIR=/var/lib/flagstream/data \
    FLAGSTREAM_FLAGS_DIR=/etc/flagstream/flags \
    FLAGSTREAM_QUERIES_DIR=/etc/flagstream/queries \
    FLAGSTREAM_TELEMETRY__LOG_FORMAT=json
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["flagstream"]
CMD ["serve"]
