# cfq-relay container image.
#
#   docker build -t cfq-relay .
#   docker run --rm -v /path/to/config.toml:/etc/cfq-relay/config.toml:ro \
#     -e CLOUDFLARE_API_TOKEN -p 9464:9464 cfq-relay
#
# Build stage: Debian 12 (bookworm), the same glibc as the runtime stage. .ci/run builds the
# binary with the very `cargo build` command below and runs it, since CI has no Docker engine.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# jemalloc, the relay's allocator (README: Performance), builds its C sources with make,
# which the slim image lacks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

# Dependencies in their own layer: built against stub sources, so that a change to src/
# does not rebuild them. The workspace's members under crates/ come whole: cargo needs every
# member, and the binary's tool commands (emulate, receive, demo) use crates/emulator.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin cfq-relay \
 && rm -rf src

# The relay itself. `touch`: the copied sources may be older than the stub build's outputs.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin cfq-relay

# Runtime: distroless (no shell, no package manager), CA certificates included, glibc and
# libgcc for the Rust binary, user 65532 "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cfq-relay /usr/local/bin/cfq-relay
# Mount the configuration here (a ConfigMap, a bind mount). The admin server listens on every
# address inside the container so /metrics can be scraped; publish the port deliberately.
ENV CFQ_RELAY_CONFIG=/etc/cfq-relay/config.toml \
    CFQ_RELAY__ADMIN__LISTEN=0.0.0.0:9464
USER 65532:65532
EXPOSE 9464
# Asks the admin server's /healthz with the binary itself: no shell tools in this image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/cfq-relay", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cfq-relay"]
CMD ["run"]
