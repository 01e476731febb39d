# Multi-stage build of the `ledger` binary (API, workers, relay and every operations command).
#   docker build -t ledger .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ledger-api && cp target/release/ledger /usr/local/bin/ledger

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 ledger
COPY --from=build /usr/local/bin/ledger /usr/local/bin/ledger
USER ledger
EXPOSE 8080
ENTRYPOINT ["ledger"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
