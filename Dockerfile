# pgwarden container image: `docker build -t pgwarden .`
# Run: docker run -p 6432:6432 -v /path/to/conf:/etc/pgwarden:ro pgwarden
# The mounted folder holds pgwarden.toml (listen = "0.0.0.0:6432") and the user list it names.

FROM rust:1.95.0-slim-bookworm AS build
# PGO=1 (the default): the profile-guided build of scripts/pgo-build, trained on
# pgbench against a scratch PostgreSQL inside this stage (13–45 % less
# user-space CPU per transaction). PGO=0: a plain `cargo build --release`.
ARG PGO=1
# protoc and the well-known .proto files for etcd-client (the default `etcd`
# feature: [coordination]); for PGO, PostgreSQL 15 and pgbench to train on.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && if [ "$PGO" = 1 ]; then apt-get install -y --no-install-recommends postgresql; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
COPY conf ./conf
COPY scripts ./scripts
RUN if [ "$PGO" = 1 ]; then scripts/pgo-build && cp target/pgo/release/pgwarden /pgwarden; \
    else cargo build --release --locked --bin pgwarden && cp target/release/pgwarden /pgwarden; fi

FROM debian:bookworm-20251117-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgwarden \
    && mkdir -p /etc/pgwarden /var/lib/pgwarden \
    && chown pgwarden:pgwarden /etc/pgwarden /var/lib/pgwarden
COPY --from=build /pgwarden /usr/local/bin/pgwarden
COPY --chown=pgwarden:pgwarden conf/pgwarden.toml /etc/pgwarden/pgwarden.toml.example
USER pgwarden
# failover.state_file = "/var/lib/pgwarden/state.json" survives restarts with a volume here.
VOLUME /var/lib/pgwarden
EXPOSE 6432
EXPOSE 9930
# /health/live answers 200 while the process serves (http_listen must be enabled,
# 127.0.0.1:9930 by default); bash's /dev/tcp spares the image an HTTP client.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9930 && printf 'GET /health/live HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
ENTRYPOINT ["/usr/local/bin/pgwarden"]
CMD ["run", "--config", "/etc/pgwarden/pgwarden.toml"]
