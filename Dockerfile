# syntax=docker/dockerfile:1
#
# The gateway's image: built on the project's own toolchain, run as a non-root user on a
# distroless base that holds the binary and the C runtime it links against, and nothing else
# (no shell, no package manager). Build it with `docker build .` (see docs/operations.md, "Deploying").
#
# Dependencies are compiled in a layer of their own (cargo-chef), so that a change to the
# gateway's code rebuilds the gateway, not the few hundred crates under it. The `dist` profile
# (Cargo.toml: thin LTO, one codegen unit) is the one BENCHMARKS.md measures.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}"
WORKDIR /build

# The recipe: the manifests and lock file only, so that this layer's cache key changes only
# when dependencies do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --profile dist --locked --recipe-path recipe.json --package ccpa-gateway
COPY . .
RUN cargo build --profile dist --locked --package ccpa-gateway --bin ccpa-gateway

# glibc, libgcc and CA certificates, as the binary needs; the `nonroot` user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ccpa-gateway" \
      org.opencontainers.image.description="gRPC gateway that reads and sets the CCPA opt-out of sale in Adobe Campaign Standard" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /build/target/dist/ccpa-gateway /usr/local/bin/ccpa-gateway
# distroless's `nonroot` user, by number so that runAsNonRoot can check it.
USER 65532:65532
# gRPC (TLS), health for probes (plaintext, health only), Prometheus metrics.
EXPOSE 50051 8081 9464
ENTRYPOINT ["ccpa-gateway"]
CMD ["serve"]
