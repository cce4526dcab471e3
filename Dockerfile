# inferstream: `inferstream run` by default; `inferstream endpoint` for the
# local model server. librdkafka is built from source by the rdkafka crate
# (configure and make, no cmake).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY assets ./assets
RUN cargo build --release --locked --bin inferstream

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/inferstream /usr/local/bin/inferstream
COPY config /etc/inferstream
USER 65534:65534
EXPOSE 9898 8080
ENTRYPOINT ["inferstream"]
CMD ["run", "--config", "/etc/inferstream/inferstream.toml"]
