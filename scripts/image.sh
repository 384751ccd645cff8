#!/bin/sh
# Build (and with --push, push) the cfq-relay container image that deploy/kubernetes/ runs.
#
#   scripts/image.sh            build  ghcr.io/cfq-relay/cfq-relay:<version in Cargo.toml>
#   scripts/image.sh --push     build, then push it (log in to the registry first)
#   scripts/image.sh --print    print the image reference only
#
#   IMAGE=registry.example.com/team/cfq-relay scripts/image.sh --push   # your own registry
#   CONTAINER_ENGINE=podman scripts/image.sh                            # docker by default
#
# The tag is the package version, the one deploy/kubernetes/deployment.yaml names (a test
# checks that they agree). With your own IMAGE, point the manifests at it:
#   (cd deploy/kubernetes && kustomize edit set image ghcr.io/cfq-relay/cfq-relay=$IMAGE:<version>)
set -eu
cd "$(dirname "$0")/.."

image=${IMAGE:-ghcr.io/cfq-relay/cfq-relay}
# The first `version = "…"` of Cargo.toml is the package's (it opens the file).
version=$(sed -n 's/^version = "\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "scripts/image.sh: no version in Cargo.toml" >&2; exit 1; }
ref="$image:$version"
engine=${CONTAINER_ENGINE:-docker}

case "${1:-}" in
  --print) echo "$ref"; exit 0 ;;
  --push | "") ;;
  *) echo "usage: scripts/image.sh [--push | --print]" >&2; exit 2 ;;
esac

echo "building $ref with $engine" >&2
"$engine" build --tag "$ref" .
if [ "${1:-}" = "--push" ]; then
  "$engine" push "$ref"
  echo "pushed $ref" >&2
fi
