#!/usr/bin/env bash
# Build the CPU image (ftdiff:cpu) with podman or docker, on a machine where no registry may
# answer: the base image is pulled if it can be, else made from the Debian mirror with
# mmdebstrap; torch and every locked dependency are downloaded as wheels on the host first
# (docker/wheels/), so the build itself needs no network.
#   docker/image.sh [TAG]          (make image)
# Environment: ENGINE=podman|docker, BASE=<image> (default python:3.11.11-slim-bookworm),
# PYTHON=<host python with pip> (default .venv/bin/python), DEBIAN_MIRROR, DEBIAN_SUITE.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/ftdiff:cpu}
PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-python:3.11.11-slim-bookworm}
source docker/engine.sh

BASE=$(resolve_base "$BASE")

# Wheels for an offline build: torch's CPU build and every locked dependency (+ setuptools,
# which builds the project). Kept between builds; `make clean` leaves them, `rm docker/wheels/*.whl` does not.
if ! ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
  "$PYTHON" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > docker/wheels/requirements.txt
  "$PYTHON" -m pip download --quiet --dest docker/wheels --only-binary=:all: --python-version 3.11 \
    -c constraints.txt -r docker/wheels/requirements.txt "torch==2.13.0" "setuptools>=68" 2>&1 |
    { grep -v "^WARNING: Location" || true; }
  rm docker/wheels/requirements.txt
fi

FORMAT=()
[ "$ENGINE" = podman ] && FORMAT=(--format docker)  # keeps HEALTHCHECK (OCI images have none)
"$ENGINE" build "${FORMAT[@]}" -f docker/Dockerfile.cpu --build-arg "BASE=$BASE" -t "$TAG" .
echo "image: built $TAG on $BASE"
