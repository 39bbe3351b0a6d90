# The kvstore runtime image: the kvstore binary and the shared libraries it links
# (Debian's RocksDB among them), nothing else: no shell, no package manager.
#
# No Rust builder image can be pulled on the machines this is built on, so the binary
# is built on the host and handed in: scripts/image runs `cargo build --release`, lays
# the binary and its libraries (as `ldd` lists them) out in the context's rootfs/
# directory, and runs `buildah bud --isolation chroot` on this file. Build it that way.
FROM scratch

ARG VERSION=dev
ARG REVISION=unknown

COPY rootfs/ /

LABEL org.opencontainers.image.title="kvstore" \
      org.opencontainers.image.description="An etcd-compatible, Raft-replicated key-value store" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A user without a login (the distroless "nonroot" IDs); the data dir is its own.
USER 65532:65532
ENV ETCD_DATA_DIR=/var/lib/kvstore/data
VOLUME /var/lib/kvstore
WORKDIR /var/lib/kvstore
EXPOSE 2379 2380
ENTRYPOINT ["/usr/bin/kvstore"]
