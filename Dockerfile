# Build: docker build -t cfq-relay .   (the full image hardening comes with the deploy issue)
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cfq-relay /usr/local/bin/cfq-relay
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/cfq-relay"]
CMD ["run", "--config", "/etc/cfq-relay/config.toml"]
