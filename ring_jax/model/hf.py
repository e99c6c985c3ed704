"""Hugging Face checkpoints ↔ (ModelConfig, variables), in two layouts.

  * ``bailing``: BailingMoeV2 (Ling / Ring 2.0 remote code): `model.word_embeddings`, fused
    `attention.query_key_value` ([H + 2N]·Q rows: q heads, then k, then v), `attention.dense`,
    `query_layernorm` / `key_layernorm`, `mlp.gate.weight` + `mlp.gate.expert_bias`,
    per-expert `mlp.experts.{e}.{gate,up,down}_proj`.
  * ``glm4_moe``: transformers' Glm4Moe (separate q/k/v/o, `q_norm` / `k_norm`,
    `mlp.gate.e_score_correction_bias`); experts per expert (the Hub format, written by
    `save`) or stacked `mlp.experts.gate_up_proj` / `down_proj` (also read).

`load` streams: tensors are read one at a time from the safetensors files (a sharded
`model.safetensors.index.json` is followed) and written into preallocated arrays of the
target dtype, so peak host memory is one copy of the model plus one tensor. `save` writes
tensor by tensor into shards of at most `max_shard_bytes`, atomically (a temporary directory
that then replaces the target). Unknown or missing tensors, and tensors whose stored shape is
not the HF shape the config implies (checked from the file headers before anything is read or
reshaped), raise a ValueError naming them. MTP weights are not converted (see `load`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ring_jax.model.config import ModelConfig

LAYOUTS = ("bailing", "glm4_moe")
INDEX_FILE = "model.safetensors.index.json"

# -- config ---------------------------------------------------------------------------------


def _rope_params(raw: dict) -> dict:
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    prf = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    out = dict(rope_theta=float(theta), partial_rotary_factor=float(prf))
    if rope.get("rope_type", rope.get("type", "default")) == "yarn":
        out.update(rope_scaling_factor=float(rope["factor"]),
                   rope_original_max_position=int(rope["original_max_position_embeddings"]),
                   yarn_beta_fast=float(rope.get("beta_fast", 32.0)),
                   yarn_beta_slow=float(rope.get("beta_slow", 1.0)))
    return out


def config_from_hf(raw: dict, **overrides) -> tuple[ModelConfig, str]:
    """ModelConfig and layout from a HF config.json dict."""
    model_type = raw.get("model_type", "")
    layout = "glm4_moe" if model_type == "glm4_moe" else "bailing"
    if model_type not in ("glm4_moe", "bailing_moe", "bailing_moe_v2"):
        raise ValueError(f"unsupported model_type {model_type!r}: expected glm4_moe or "
                         "bailing_moe(_v2)")
    if raw.get("attention_bias") or raw.get("use_qkv_bias") or raw.get("use_bias"):
        raise ValueError("attention/linear biases are not part of Ling 2.0 (attention_bias, "
                         "use_qkv_bias, use_bias must be false)")
    if raw.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings must be false (Ling 2.0 unties them)")
    experts = raw.get("n_routed_experts" if layout == "glm4_moe" else "num_experts") or 0
    shared = raw.get("n_shared_experts" if layout == "glm4_moe" else "num_shared_experts") or 0
    fields = dict(
        vocab_size=raw["vocab_size"], num_layers=raw["num_hidden_layers"],
        hidden_size=raw["hidden_size"], num_heads=raw["num_attention_heads"],
        num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        first_k_dense_replace=raw.get("first_k_dense_replace", 0) if experts else 0,
        num_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok", 1),
        num_shared_experts=shared,
        moe_intermediate_size=raw.get("moe_intermediate_size", 1),
        n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        score_function=raw.get("score_function", raw.get("scoring_func", "sigmoid")),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        use_qk_norm=bool(raw.get("use_qk_norm", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        initializer_range=float(raw.get("initializer_range", 0.02)),
        **_rope_params(raw))
    fields.update(overrides)
    return ModelConfig(**fields), layout


def config_to_hf(cfg: ModelConfig, layout: str) -> dict:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor}
    if cfg.rope_scaling_factor != 1.0:
        rope.update(rope_type="yarn", factor=cfg.rope_scaling_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position,
                    beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        initializer_range=cfg.initializer_range, use_qk_norm=cfg.use_qk_norm,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
        topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
        first_k_dense_replace=cfg.first_k_dense_replace if cfg.is_moe else cfg.num_layers,
        rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor,
        rope_parameters=rope, num_nextn_predict_layers=0, torch_dtype=cfg.param_dtype)
    if layout == "glm4_moe":
        if cfg.score_function != "sigmoid":
            raise ValueError("glm4_moe layout only has sigmoid routing (score_function)")
        return dict(common, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"],
                    attention_bias=False, n_routed_experts=max(cfg.num_experts, 1),
                    n_shared_experts=cfg.num_shared_experts)
    return dict(common, model_type="bailing_moe", architectures=["BailingMoeV2ForCausalLM"],
                num_experts=cfg.num_experts, num_shared_experts=cfg.num_shared_experts,
                score_function=cfg.score_function, use_qkv_bias=False, use_bias=False,
                moe_router_enable_expert_bias=True,
                rope_scaling=None if cfg.rope_scaling_factor == 1.0 else rope)


# -- the tensor map -------------------------------------------------------------------------
# One entry per variable: (collection path, HF tensor names, HF tensors -> ours, ours -> HF).


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # ('params', 'layers_1', 'moe', 'gate')
    shape: tuple[int, ...]
    names: tuple[str, ...]  # HF tensors this variable is made of
    hf_shape: tuple[int, ...]  # the shape every one of `names` must have in the checkpoint
    to_ours: Callable[[list[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]


def _linear(path, shape, name):
    """torch Linear weight [out, in] <-> kernel [in, ...out] (reshaped)."""
    in_dim = shape[0]
    return _Entry(path, shape, (name,), (math.prod(shape[1:]), in_dim),
                  lambda t: t[0].T.reshape(shape), lambda w: [w.reshape(in_dim, -1).T])


def _linear_out_first(path, shape, name):
    """torch Linear weight [out, in] <-> kernel [...in, out] (o projection [H, Q, D])."""
    out_dim = shape[-1]
    return _Entry(path, shape, (name,), (out_dim, math.prod(shape[:-1])),
                  lambda t: t[0].T.reshape(shape), lambda w: [w.reshape(-1, out_dim).T])


def _copy(path, shape, name):
    return _Entry(path, shape, (name,), shape, lambda t: t[0].reshape(shape), lambda w: [w])


def _entries(cfg: ModelConfig, layout: str, stacked_experts: bool = False) -> list[_Entry]:
    D, H, N, Q, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.vocab_size)
    E, F = cfg.num_experts, cfg.moe_intermediate_size
    bailing = layout == "bailing"
    P = ("params",)
    out = [
        _copy(P + ("embed",), (V, D),
              "model.word_embeddings.weight" if bailing else "model.embed_tokens.weight"),
        _copy(P + ("final_norm", "scale"), (D,), "model.norm.weight"),
        _linear(P + ("lm_head", "kernel"), (D, V), "lm_head.weight"),
    ]
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}", P + (f"layers_{i}",)
        attn = f"{p}.attention" if bailing else f"{p}.self_attn"
        out += [_copy(L + ("attn_norm", "scale"), (D,), f"{p}.input_layernorm.weight"),
                _copy(L + ("ffn_norm", "scale"), (D,), f"{p}.post_attention_layernorm.weight")]
        if bailing:
            out += _fused_qkv(L, cfg, f"{attn}.query_key_value.weight")
            out.append(_linear_out_first(L + ("attn", "o"), (H, Q, D), f"{attn}.dense.weight"))
        else:
            out += [_linear(L + ("attn", "q"), (D, H, Q), f"{attn}.q_proj.weight"),
                    _linear(L + ("attn", "k"), (D, N, Q), f"{attn}.k_proj.weight"),
                    _linear(L + ("attn", "v"), (D, N, Q), f"{attn}.v_proj.weight"),
                    _linear_out_first(L + ("attn", "o"), (H, Q, D), f"{attn}.o_proj.weight")]
        if cfg.use_qk_norm:
            qn, kn = ("query_layernorm", "key_layernorm") if bailing else ("q_norm", "k_norm")
            out += [_copy(L + ("attn", "q_norm", "scale"), (Q,), f"{attn}.{qn}.weight"),
                    _copy(L + ("attn", "k_norm", "scale"), (Q,), f"{attn}.{kn}.weight")]
        if not cfg.is_moe_layer(i):
            out += [_linear(L + ("mlp", w), s, f"{p}.mlp.{w}_proj.weight") for w, s in
                    (("gate", (D, cfg.intermediate_size)), ("up", (D, cfg.intermediate_size)),
                     ("down", (cfg.intermediate_size, D)))]
            continue
        M = L + ("moe",)
        bias = "expert_bias" if bailing else "e_score_correction_bias"
        out += [_linear(M + ("router",), (D, E), f"{p}.mlp.gate.weight"),
                _copy(("router",) + L[1:] + ("moe", "expert_bias"), (E,),
                      f"{p}.mlp.gate.{bias}")]
        if stacked_experts:
            out += _stacked_experts(M, cfg, f"{p}.mlp.experts")
        else:
            for w, s in (("gate", (E, D, F)), ("up", (E, D, F)), ("down", (E, F, D))):
                names = tuple(f"{p}.mlp.experts.{e}.{w}_proj.weight" for e in range(E))
                out.append(_Entry(M + (w,), s, names, s[:0:-1],
                                  lambda t: np.stack([x.T for x in t]),
                                  lambda w_: [x.T for x in w_]))
        if cfg.num_shared_experts:
            Fs = F * cfg.num_shared_experts
            out += [_linear(M + ("shared", w), s, f"{p}.mlp.shared_experts.{w}_proj.weight")
                    for w, s in (("gate", (D, Fs)), ("up", (D, Fs)), ("down", (Fs, D)))]
    return out


def _fused_qkv(L, cfg, name):
    """query_key_value [(H + 2N)·Q, D]: rows are q heads, then k heads, then v heads."""
    D, H, N, Q = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bounds = {"q": (0, H), "k": (H, H + N), "v": (H + N, H + 2 * N)}
    out = []
    for w, (lo, hi) in bounds.items():
        def to_ours(t, lo=lo, hi=hi):
            return t[0].reshape(H + 2 * N, Q, D)[lo:hi].transpose(2, 0, 1)
        out.append(_Entry(L + ("attn", w), (D, hi - lo, Q), (name,), ((H + 2 * N) * Q, D),
                          to_ours, None))
    return out


def _stacked_experts(M, cfg, prefix):
    """transformers-internal stacked layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    return [_Entry(M + ("gate",), (E, D, F), (f"{prefix}.gate_up_proj",), (E, 2 * F, D),
                   lambda t: t[0][:, :F].transpose(0, 2, 1), None),
            _Entry(M + ("up",), (E, D, F), (f"{prefix}.gate_up_proj",), (E, 2 * F, D),
                   lambda t: t[0][:, F:].transpose(0, 2, 1), None),
            _Entry(M + ("down",), (E, F, D), (f"{prefix}.down_proj",), (E, D, F),
                   lambda t: t[0].transpose(0, 2, 1), None)]


# -- reading --------------------------------------------------------------------------------


class _Reader:
    """Lazily opened safetensors files of a checkpoint directory (single file or index)."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors in {path}")
            weight_map = {}
            for file in files:
                with safe_open(os.path.join(path, file), framework="numpy") as f:
                    weight_map.update({k: file for k in f.keys()})
        self.path, self.weight_map, self._open = path, weight_map, {}

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._open[file]

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file header (no tensor data is read)."""
        return tuple(self._file(name).get_slice(name).get_shape())


def _check_shapes(reader: _Reader, entries: list[_Entry], path: str) -> None:
    """Every HF tensor must have exactly its HF shape before any reshape: a transposed
    `lm_head.weight` [D, V] has the element count of [V, D] and would load scrambled."""
    wrong = {}
    for entry in entries:
        for name in entry.names:
            if name not in wrong and (found := reader.shape(name)) != entry.hf_shape:
                wrong[name] = f"{name}: expected {list(entry.hf_shape)}, found {list(found)}"
    if wrong:
        listed = list(wrong.values())
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape for its config.json: "
                         + "; ".join(listed[:20]) + (" ..." if len(listed) > 20 else ""))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load(path: str, *, param_dtype: str = "float32", **overrides) -> tuple[ModelConfig, dict]:
    """Reads a HF checkpoint directory (config.json + safetensors) in either layout.

    Returns `(cfg, variables)` with numpy arrays of `param_dtype` ('router' expert biases stay
    float32). `overrides` replace ModelConfig fields (e.g. moe_impl, dtype). MTP weights
    (layers >= num_hidden_layers when `num_nextn_predict_layers` > 0) are skipped: the loaded
    config has num_mtp_layers=0.
    """
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    cfg, layout = config_from_hf(raw, param_dtype=param_dtype, **overrides)
    reader = _Reader(path)
    stacked = any(k.endswith("mlp.experts.gate_up_proj") for k in reader.weight_map)
    entries = _entries(cfg, layout, stacked_experts=stacked)
    wanted = {n for e in entries for n in e.names}
    missing = sorted(wanted - set(reader.weight_map))
    mtp = re.compile(r"model\.layers\.(\d+)\.")
    unknown = sorted(
        k for k in set(reader.weight_map) - wanted
        if not (raw.get("num_nextn_predict_layers") and (m := mtp.match(k))
                and int(m.group(1)) >= cfg.num_layers))
    if missing or unknown:
        raise ValueError(f"checkpoint {path} does not match its config ({layout} layout): "
                         f"missing tensors {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                         f"unknown tensors {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    _check_shapes(reader, entries, path)
    variables: dict = {}
    for entry in entries:
        dtype = np.float32 if entry.path[0] == "router" else jnp.dtype(param_dtype)
        if len(entry.names) > 1:  # per-expert tensors: fill a preallocated stack in place
            out = np.empty(entry.shape, dtype)
            for e, name in enumerate(entry.names):
                out[e] = reader.get(name).astype(np.float32).T
        else:
            out = entry.to_ours([reader.get(entry.names[0]).astype(np.float32)]).astype(dtype)
        _set(variables, entry.path, out)
    return cfg, variables


# -- writing --------------------------------------------------------------------------------


def _hf_tensors(cfg: ModelConfig, variables: dict, layout: str) -> Iterator[tuple[str, Any]]:
    """(name, array) pairs in checkpoint order, one at a time."""
    fused: dict[str, dict[str, np.ndarray]] = {}
    for entry in _entries(cfg, layout):
        value = np.asarray(_get(variables, entry.path))
        if entry.to_hf is None:  # fused qkv: emit once all three parts are collected
            parts = fused.setdefault(entry.names[0], {})
            parts[entry.path[-1]] = value
            if len(parts) == 3:
                qkv = np.concatenate([parts[w].transpose(1, 2, 0) for w in "qkv"], axis=0)
                yield entry.names[0], qkv.reshape(-1, cfg.hidden_size)
            continue
        for name, tensor in zip(entry.names, entry.to_hf(value)):
            yield name, tensor


def save(path: str, cfg: ModelConfig, variables: dict, *, layout: str = "bailing",
         dtype: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
    """Writes config.json + safetensors shards (+ index when more than one) in `layout`.

    `dtype` (default cfg.param_dtype) is the stored dtype of the parameters; the expert bias
    is always stored float32. Atomic: everything is written into a temporary sibling
    directory that then replaces `path`, so an interrupted save leaves the previous one intact
    and no shard or index of an earlier save survives a later one (`load` would follow a stale
    index). Other files already in `path` (a tokenizer, a README) are carried over.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if cfg.num_mtp_layers:
        raise ValueError("num_mtp_layers > 0: MTP weights have no HF mapping here")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"hf.save: {path} exists and is not a directory")
    path = os.path.realpath(path)  # a symlinked directory is replaced where it lives
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # mkdir (not mkdtemp) so the directory gets the umask's permissions
    try:
        _write_checkpoint(tmp, cfg, variables, layout, dtype, max_shard_bytes)
        if os.path.isdir(path):
            _carry_over_other_files(path, tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_weight_file(name: str) -> bool:
    return name in ("config.json", INDEX_FILE) or name.endswith(".safetensors")


def _carry_over_other_files(old: str, new: str) -> None:
    for name in os.listdir(old):
        if _is_weight_file(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


def _replace_dir(new: str, path: str) -> None:
    """Renames `new` onto `path`; an existing `path` is moved aside first and deleted after
    (rename(2) cannot replace a non-empty directory)."""
    if not os.path.exists(path):
        os.rename(new, path)
        return
    old = f"{new}.old"
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


def _write_checkpoint(path: str, cfg: ModelConfig, variables: dict, layout: str,
                      dtype: str | None, max_shard_bytes: int) -> None:
    dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or cfg.param_dtype) == "bfloat16" \
        else np.dtype(dtype or cfg.param_dtype)
    hf_cfg = config_to_hf(cfg, layout)
    hf_cfg["torch_dtype"] = str(jnp.dtype(dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    # Shards are written as soon as they are full (temporary names, renamed at the end once
    # their count is known), so at most one shard is held in memory.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        tmp = f"shard-{len(written):05d}.tmp"
        save_file(shard, os.path.join(path, tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    for name, tensor in _hf_tensors(cfg, variables, layout):
        keep32 = name.endswith(("expert_bias", "e_score_correction_bias"))
        tensor = np.ascontiguousarray(tensor.astype(np.float32 if keep32 else dtype))
        if size + tensor.nbytes > max_shard_bytes and shard:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    if len(written) == 1:
        os.replace(os.path.join(path, written[0][0]), os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, file))
        weight_map.update({k: file for k in names})
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
