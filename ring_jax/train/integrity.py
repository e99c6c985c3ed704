"""Integrity data of a checkpoint: what `Checkpointer` records at save and checks at restore.

A checkpoint whose bytes changed on disk (a flipped bit, a partial overwrite) may still load
without any error from orbax or TensorStore; training then continues on garbage. So every save
records, in the `meta` item under ``_integrity``:

  state    per array leaf (keyed by its tree path): a 64-bit fingerprint of the raw bits, the
           dtype and the shape. The fingerprint is computed on device by one jitted reduction in
           wrapping uint32 arithmetic, so it is exact and independent of the array's sharding
           and of the mesh it is restored onto (a multi-process run gets the same value on every
           process, no gather needed).
  arrays   per host numpy array of the `arrays` item: its SHA-256.
  finite   whether every floating-point leaf of the state was finite when saved.

and stores the SHA-256 of the `meta` item itself (integrity record included) in the `arrays`
item, so each of the three items is checked by data held in another.

Fingerprint of an array x with n elements, bits b_i (x's raw bits as uint32 words) and linear
index i, for two seeds s:  F_s(x) = Σ_i mix(b_i XOR mix(i·φ + s)) mod 2^32, with `mix` the
murmur3 finaliser (a bijection on uint32) and φ = 0x9E3779B9. Changing any one element changes
exactly one term of the sum, so any single corrupted element is always detected; several are
missed with probability ~2^-64.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

INTEGRITY_KEY = "_integrity"
META_DIGEST_KEY = "_meta_sha256"
_SEEDS = (0x2545F491, 0x6C8E9CF5)
_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection that spreads every input bit over the word."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
    """x's raw bits as uint32 words (64-bit elements give a trailing axis of two words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(jnp.uint32)


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index built from iotas, so a sharded array is never reshaped."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= shape[axis]
    return index


def _fingerprint(x: jax.Array) -> jax.Array:
    """[2] uint32: F_s(x) for both seeds (module docstring)."""
    words = _as_words(x)
    index = _linear_index(words.shape)
    return jnp.stack([jnp.sum(_mix(words ^ _mix(index * jnp.uint32(_GOLDEN) + jnp.uint32(s))),
                              dtype=jnp.uint32) for s in _SEEDS])


def _finite(leaves: list[jax.Array]) -> jax.Array:
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)


@jax.jit
def _summarise(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    return [_fingerprint(x) for x in leaves], _finite(leaves)


def _array_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path string, leaf) of every array leaf, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape")]


def _host(x: jax.Array) -> np.ndarray:
    """A replicated scalar/vector output as numpy (every process holds a full copy)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _by_device_set(leaves: list[Any]) -> dict[tuple, list[int]]:
    """Leaf indices grouped by the devices holding them: one jit call may not mix arrays
    committed to different device sets (a key on one device next to mesh-sharded params)."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        sharding = getattr(x, "sharding", None)
        devices = tuple(sorted(d.id for d in sharding.device_set)) if sharding else ()
        groups.setdefault(devices, []).append(i)
    return groups


def _fingerprints(leaves: list[Any]) -> tuple[list[str], bool]:
    """(fingerprint hex per leaf, all floating-point leaves finite)."""
    leaves = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for x in leaves]
    hexes: list[str] = [""] * len(leaves)
    finite = True
    for indices in _by_device_set(leaves).values():
        fingerprints, group_finite = _summarise([leaves[i] for i in indices])
        finite = finite and bool(_host(group_finite))
        for i, fp in zip(indices, fingerprints):
            w = _host(fp).astype(np.uint64)
            hexes[i] = f"{int(w[0] << np.uint64(32) | w[1]):016x}"
    return hexes, finite


def summarise_state(state: Any) -> tuple[dict[str, list], bool]:
    """({path: [fingerprint hex, dtype, shape]}, all floating-point leaves finite) of a state
    pytree in its stored form (no typed keys)."""
    named = _array_leaves(state)
    fingerprints, finite = _fingerprints([x for _, x in named])
    return ({path: [fp, np.dtype(x.dtype).str, list(x.shape)]
             for (path, x), fp in zip(named, fingerprints)}, finite)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite: a bool scalar, traceable, so a
    jitted train step reports it among its metrics (no extra pass over the weights)."""
    return _finite([x for _, x in _array_leaves(tree)])


def sha256_array(x: np.ndarray) -> str:
    x = np.ascontiguousarray(x)
    return hashlib.sha256(x.dtype.str.encode() + repr(x.shape).encode() + x.tobytes()).hexdigest()


def sha256_json(value: Any) -> str:
    """Digest of a JSON-able value in a canonical form (sorted keys), as orbax stores it."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def digest_to_array(hex_digest: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_digest), np.uint8).copy()


def array_to_digest(array: np.ndarray) -> str:
    return np.asarray(array, np.uint8).tobytes().hex()


def check_state(recorded: Mapping[str, list], state: Any) -> list[str]:
    """The problems of a restored state against its record: a fingerprint that differs (only
    leaves restored in their saved dtype are compared; a cast on load changes the bits)."""
    named = [(p, x) for p, x in _array_leaves(state)
             if p in recorded and np.dtype(x.dtype).str == recorded[p][1]]
    fingerprints, _ = _fingerprints([x for _, x in named])
    return [f"state{p}: checksum mismatch" for (p, _), fp in zip(named, fingerprints)
            if fp != recorded[p][0]]


def check_structure(recorded: Mapping[str, list], target: Any, partial: bool) -> list[str]:
    """How `target` (the state the caller wants) differs from the saved state's leaves: missing
    or extra leaves, other shapes. A non-empty answer means a different model/optimizer, not a
    damaged file."""
    wanted = {p: list(x.shape) for p, x in _array_leaves(target)}
    problems = [f"state{p}: saved shape {recorded[p][2]}, wanted {shape}"
                for p, shape in wanted.items() if p in recorded and recorded[p][2] != shape]
    problems += [f"state{p}: wanted but not in the checkpoint" for p in wanted
                 if p not in recorded]
    if not partial:
        problems += [f"state{p}: in the checkpoint but not wanted" for p in recorded
                     if p not in wanted]
    return problems
