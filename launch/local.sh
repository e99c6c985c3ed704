#!/usr/bin/env bash
# One process on this machine (CPU, or all local GPUs/TPU chips of a single host).
#
#   launch/local.sh --config=experiments/quickstart.py --workdir=runs/quickstart \
#       [--config.rl.loss.alpha=0.5 ...]
#
# Environment: PYTHON (default: python), RING_JAX_MODULE (default: ring_jax.main; e.g.
# ring_jax.train.distributed for a self-check of the setup).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m "${RING_JAX_MODULE:-ring_jax.main}" "$@"
