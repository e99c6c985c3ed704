#!/usr/bin/env bash
# ring_jax on a Cloud TPU VM or pod slice: the same command on every worker (gcloud --worker=all);
# jax.distributed reads the pod topology from the TPU metadata (RING_JAX_DISTRIBUTED=auto).
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE            # copy this checkout + install on all workers
#   launch/tpu_vm.sh run   TPU_NAME ZONE -- --config=experiments/quickstart.py \
#       --workdir=gs://BUCKET/runs/qs [--config.rl.loss.alpha=0.5 ...]
#   launch/tpu_vm.sh check TPU_NAME ZONE            # cross-worker psum self-check
#
# Use a gs:// workdir (or a disk every worker mounts): all workers write checkpoint shards.
# Environment: PROJECT (gcloud project, optional), REMOTE_DIR (default: ring_jax).
set -euo pipefail
usage() { echo "usage: $0 {setup|run|check} TPU_NAME ZONE [-- ARGS...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
ACTION="$1"; TPU="$2"; ZONE="$3"; shift 3
[ "${1:-}" = "--" ] && shift
REMOTE_DIR="${REMOTE_DIR:-ring_jax}"
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
on_all_workers() { "${GCLOUD[@]}" ssh "$TPU" "${FLAGS[@]}" --worker=all --command="$1"; }
# Arguments are quoted once here so they reach the remote python unchanged.
quoted_args=""
for arg in "$@"; do quoted_args+=" $(printf '%q' "$arg")"; done

case "$ACTION" in
  setup)
    REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="$(mktemp -t ring_jax_src.XXXXXX).tar.gz"
    git -C "$REPO" archive --format=tar.gz -o "$archive" HEAD
    "${GCLOUD[@]}" scp "$archive" "$TPU:ring_jax_src.tar.gz" "${FLAGS[@]}" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf ring_jax_src.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'"
    ;;
  run)
    on_all_workers "cd $REMOTE_DIR && RING_JAX_DISTRIBUTED=auto .venv/bin/python -m ring_jax.main$quoted_args"
    ;;
  check)
    on_all_workers "cd $REMOTE_DIR && RING_JAX_DISTRIBUTED=auto .venv/bin/python -m ring_jax.train.distributed"
    ;;
  *) usage ;;
esac
