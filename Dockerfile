# pgwarden container image: `docker build -t pgwarden .`
# Run: docker run -p 6432:6432 -v /path/to/conf:/etc/pgwarden:ro pgwarden
# The mounted folder holds pgwarden.toml (listen = "0.0.0.0:6432") and the user list it names.

FROM rust:1.95.0-slim-bookworm AS build
# protoc and the well-known .proto files for etcd-client (the default `etcd`
# feature: [coordination])
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
COPY conf ./conf
RUN cargo build --release --locked --bin pgwarden

FROM debian:bookworm-20251117-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgwarden \
    && mkdir -p /etc/pgwarden /var/lib/pgwarden \
    && chown pgwarden:pgwarden /etc/pgwarden /var/lib/pgwarden
COPY --from=build /src/target/release/pgwarden /usr/local/bin/pgwarden
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
