# Sourced by docker/*.sh: ENGINE is podman (preferred: it runs without a daemon) or docker;
# have_image and resolve_base (the base image when no registry answers).
if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null; then ENGINE=podman
  elif docker info >/dev/null 2>&1; then ENGINE=docker
  else echo "no container engine: install podman (apt-get install podman) or run a Docker daemon" >&2; exit 2
  fi
fi
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  export CONTAINERS_CONF="$PWD/docker/containers.conf"
fi
export ENGINE

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# resolve_base IMAGE: IMAGE if it is here or can be pulled; else a Debian base made from the
# mirror with mmdebstrap (DEBIAN_SUITE, DEBIAN_MIRROR), imported once as localhost/ftdiff-base.
resolve_base() {
  local base=$1 suite=${DEBIAN_SUITE:-bookworm} mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local local_base=localhost/ftdiff-base:${DEBIAN_SUITE:-bookworm}
  if have_image "$base" || timeout 90 "$ENGINE" pull -q "$base" >/dev/null 2>&1; then
    echo "$base"; return
  fi
  if ! have_image "$local_base"; then
    echo "image: $base cannot be pulled; making $local_base from $mirror ($suite)" >&2
    command -v mmdebstrap >/dev/null || { echo "image: mmdebstrap is needed (apt-get install mmdebstrap)" >&2; exit 2; }
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
      --aptopt='APT::Install-Recommends "false"' \
      --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
      "$suite" - "$mirror" | "$ENGINE" import - "$local_base" >/dev/null
  fi
  echo "$local_base"
}
