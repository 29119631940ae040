#!/usr/bin/env bash
# `make image-smoke`: the built CPU image, run for real as its unprivileged user: --version, a
# dry run, a 60-step job, the HEALTHCHECK command against a running job, SIGTERM -> exit 43 with
# an emergency checkpoint that verifies, and a resume from it.
#   docker/smoke.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/ftdiff:cpu}
source docker/engine.sh
NAME=ftdiff-smoke-$$
WORK=$(mktemp -d /tmp/ftdiff-smoke-XXXXXX)
cleanup() { "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
# The image runs as uid 10001: give it the folder it writes (checkpoints under /work/runs).
if [ "$(id -u)" = 0 ]; then chown 10001:10001 "$WORK"; else chmod 0777 "$WORK"; fi
# --no-healthcheck: the engine's own timer needs systemd; the check is run by hand below.
RUN=("$ENGINE" run --rm --no-healthcheck --shm-size=1g -v "$WORK:/work")
JOB=(--set train.global_batch_size=8 --set data.epoch_size=64 --set logging.sample_every=0
     --set logging.tensorboard=false --set train.warmup_steps=2)
say() { echo "image-smoke: $*"; }
fail() { echo "image-smoke: FAILED: $*" >&2; exit 1; }
last_step() { "${RUN[@]}" "$TAG" ckpt ls /work/runs/ftdiff/checkpoints --json |
  python3 -c "import json,sys; print(max(c['step'] for c in json.load(sys.stdin) if c['committed']))"; }

say "version: $("${RUN[@]}" "$TAG" --version)"
[ "$("${RUN[@]}" --entrypoint id "$TAG" -u)" = 10001 ] || fail "the image does not run as uid 10001"
"${RUN[@]}" "$TAG" train --dry-run "${JOB[@]}" >/dev/null || fail "train --dry-run"
say "dry run ok"

"${RUN[@]}" "$TAG" train "${JOB[@]}" --set train.max_steps=60 --set checkpoint.every_steps=20 \
  >"$WORK/job1.log" 2>&1 || { tail -20 "$WORK/job1.log"; fail "the 60-step job"; }
[ "$(last_step)" = 60 ] || fail "step 60 is not committed"
[ "$(stat -c %u "$WORK/runs/ftdiff/checkpoints")" = 10001 ] || fail "checkpoints not written as uid 10001"
say "60-step job committed step 60 as uid 10001"

# A long job: the HEALTHCHECK command (read from the image, so the image must carry it) must pass
# while it trains; SIGTERM must end it with 43 after an emergency commit.
"$ENGINE" run -d --no-healthcheck --name "$NAME" --shm-size=1g -v "$WORK:/work" "$TAG" train "${JOB[@]}" \
  --set train.max_steps=100000 --set train.step_sleep_s=0.05 --set checkpoint.every_steps=1000 >/dev/null
health=$("$ENGINE" image inspect --format '{{json .Config.Healthcheck.Test}}' "$TAG")
[ "$health" != null ] && [ -n "$health" ] || fail "the image has no HEALTHCHECK (build with --format docker)"
mapfile -t check < <(python3 -c "import json,sys; t=json.loads(sys.argv[1]); print('\n'.join(t[1:]))" "$health")
healthy=""
for _ in $(seq 1 90); do
  if "$ENGINE" exec "$NAME" "${check[@]}" >/dev/null 2>&1; then healthy=yes; break; fi
  sleep 2
done
[ -n "$healthy" ] || { "$ENGINE" logs "$NAME" 2>&1 | tail -20; fail "HEALTHCHECK never passed"; }
say "HEALTHCHECK passes"
trained=""
for _ in $(seq 1 90); do  # SIGTERM only once the job trains past step 60 (else nothing to save)
  if "$ENGINE" logs "$NAME" 2>&1 | grep -Eq '"step (7|8|9)[0-9]/|step (7|8|9)[0-9]/'; then trained=yes; break; fi
  sleep 2
done
[ -n "$trained" ] || { "$ENGINE" logs "$NAME" 2>&1 | tail -20; fail "the long job never trained past step 70"; }
"$ENGINE" exec "$NAME" "${check[@]}" >/dev/null 2>&1 || fail "HEALTHCHECK fails while the job trains"
say "HEALTHCHECK passes while the job trains"
"$ENGINE" stop -t 90 "$NAME" >/dev/null
code=$("$ENGINE" wait "$NAME" 2>/dev/null || "$ENGINE" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 43 ] || { "$ENGINE" logs "$NAME" 2>&1 | tail -20; fail "SIGTERM ended the job with $code, not 43"; }
emergency=$(last_step)
[ "$emergency" -gt 60 ] || fail "no emergency checkpoint after step 60 (newest: $emergency)"
"${RUN[@]}" "$TAG" ckpt verify /work/runs/ftdiff/checkpoints >/dev/null || fail "the emergency checkpoint does not verify"
say "SIGTERM: exit 43, emergency checkpoint at step $emergency verifies"

"${RUN[@]}" "$TAG" train "${JOB[@]}" --set train.max_steps=$((emergency + 10)) --set checkpoint.every_steps=1000 \
  >"$WORK/job3.log" 2>&1 || { tail -20 "$WORK/job3.log"; fail "the resumed job"; }
grep -q "resum" "$WORK/job3.log" || fail "the third job did not say it resumed"
[ "$(last_step)" = $((emergency + 10)) ] || fail "the resumed job did not commit step $((emergency + 10))"
say "resumed from step $emergency and committed step $((emergency + 10))"
say "all checks passed"
