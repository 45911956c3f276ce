# The mcpfly controller image (what charts/mcpfly runs): `docker build -t ghcr.io/mcpfly/mcpfly:0.1.0 .`
#
# Two stages: the Rust toolchain builds a release binary, and only that binary goes into a distroless image
# (glibc and CA certificates, no shell, no package manager) that runs as the `nonroot` user (65532), matching the
# chart's runAsNonRoot and read-only root filesystem. Base images are pinned by digest so a rebuild uses the
# same bytes; update tag and digest together.

FROM rust:1.89-slim-bookworm@sha256:d7fc7de78bb8c1469933aeecbf801314d30d7d6e9f0578bba4cfa285bfa37fe6 AS build
WORKDIR /src
# Everything the workspace needs to resolve (members included); .dockerignore keeps target/ and .git out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mcpfly --bin mcpfly --no-default-features \
    && install -D -m 0755 target/release/mcpfly /out/mcpfly

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
LABEL org.opencontainers.image.title="mcpfly" \
      org.opencontainers.image.description="Kubernetes controller that runs MCP servers on Fly.io" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/mcpfly /usr/local/bin/mcpfly
USER 65532:65532
EXPOSE 8080
ENV MCPFLY_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/mcpfly"]
CMD ["controller"]
