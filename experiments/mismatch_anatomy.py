"""Study 1 of issue 7: anatomy of the training–inference mismatch (IcePop blog Figs 1–3).

PAPER §1 claims, for the gap between the rollout engine's log π_infer and the trainer's
recomputed log π_train at the same weights:
  (a) it is larger for a MoE model than for a dense model of the same active size;
  (b) it grows with the token position in the response;
  (c) the fraction of tokens whose routed expert set differs between the engines grows with
      depth (MoE layer index);
  (d) it grows over RL training.

Procedure (all on this machine's CPU):
  1. Build a MoE model (``small``-like) and a dense model (``num_experts=0``) whose FFN width is
     solved so that ``presets.param_count`` gives the same *active* parameters per token.
  2. Warm-start both with the same short SFT (`ring_jax.train.sft`) on step-by-step
     multiplication — random-init weights give near-uniform logits, which makes the mismatch
     unrealistically small; SFT makes the distributions peaked like a real policy's. The SFT
     trains the trainer's own numerics (float32, dropless MoE dispatch, `trainer_config`), so no
     token is dropped anywhere in the study. The SFT directories are cached under
     ``--work_dir`` (keyed by the study config) and reused.
  3. For each model and engine precision — fp32 (control), bf16, bf16 + fp8 (e4m3) routed-expert
     weights — generate rollouts with `Engine` (temperature 1, expert ids recorded), then
     recompute the trainer's float32 log-probs and experts with `probe.trainer_view` (one
     full forward without KV cache, dropless MoE).
  4. "After RL vs at start": the same measurement for the policy of an RL workdir (default the
     README quickstart's ``runs/quickstart``) and its SFT start (``<workdir>/sft``).

The issue-12 harness: prompts are the task's fixed evaluation set (`evaluate.eval_records`:
held-out split, disjoint from every SFT draw by construction, the same for every seed); the study
seed fans out through `derive.stream_seed` to the named streams ``init`` (model init), ``sft``
(SFT data) and ``sampling`` (the engine's per-request keys), as in an experiment.

Writes into ``--out_dir``: results.json (every number), summary.md (its tables and the
headline ratios quoted in experiments/REPRODUCING.md) and four PNGs: fig1_abs_dlogp_hist.png,
fig2_position.png, fig3_flips_vs_depth.png, fig4_training.png.

Commands:
    python experiments/mismatch_anatomy.py                # --size=local, ~9 min on 2 CPU cores
    python experiments/mismatch_anatomy.py --size=tiny --out_dir=/tmp/ma  # smoke, ~2.5 min
    # summary.md again from a committed results.json (no model is run):
    python experiments/mismatch_anatomy.py --from_results=experiments/figures/mismatch_anatomy/results.json

Variants: ``get_config("local" | "tiny")``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from ring_jax.data import tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import ModelConfig, Transformer, presets
from ring_jax.rollout import probe, reference
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams
from ring_jax.train import checkpoint as checkpoint_lib
from ring_jax.train import derive, evaluate, optim, sft
from ring_jax.train.experiment import parse_config_arg

DEFAULT_TRAINED_WORKDIR = "runs/quickstart"  # README's quickstart workdir
PRECISIONS = {
    "fp32": InferencePrecision(dtype="float32"),
    "bf16": InferencePrecision(dtype="bfloat16"),
    "fp8": InferencePrecision(dtype="bfloat16", fp8_expert_weights=True),
}
# IcePop's band (PAPER §1, α=0.5, β=5): a token is masked when k = π_train/π_infer leaves it.
ICEPOP_ALPHA, ICEPOP_BETA = 0.5, 5.0


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    moe: ModelConfig
    task_name: str = "multiplication"
    task_kwargs: tuple[tuple[str, Any], ...] = (("min_size", 3), ("max_size", 4))
    sft_steps: int = 120
    sft_batch_size: int = 4
    sft_seq_len: int = 256
    sft_learning_rate: float = 3e-3
    num_prompts: int = 64  # rollouts per (model, precision) arm, one per prompt
    max_new_tokens: int = 128
    max_len: int = 192
    num_slots: int = 32
    temperature: float = 1.0
    bucket_edges: tuple[int, ...] = (0, 8, 16, 32, 64, 128)
    trained_num_prompts: int = 128  # rollouts per arm of the RL-trained vs start comparison
    trained_max_new_tokens: int = 40
    seed: int = 0  # fans out to the init / sft / sampling streams (`derive.stream_seed`)


def get_config(arg: str = "local") -> StudyConfig:
    """``local``: a 6-layer small-like MoE (1 dense + 5 MoE layers, 16 experts in 4 groups,
    top-2 + 1 shared expert, D=128) vs a dense model of equal active size. ``tiny``: the
    smoke-test size (2 MoE layers, a few prompts and SFT steps). Anything else is an error."""
    sizes, _ = parse_config_arg(arg, {"local", "tiny"}, set())
    if len(sizes) != 1:
        raise ValueError(f"arg {arg!r}: choose one size, 'local' or 'tiny'")
    if "local" in sizes:
        moe = presets.get("small", hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                          intermediate_size=512, num_experts=16, num_experts_per_tok=2,
                          moe_intermediate_size=128, n_group=4, topk_group=2)
        return StudyConfig(moe=moe)
    moe = presets.get("tiny", num_layers=3)  # "tiny"
    return StudyConfig(moe=moe, sft_steps=4, sft_batch_size=4, sft_seq_len=128,
                       num_prompts=8, max_new_tokens=24, max_len=96, num_slots=8,
                       bucket_edges=(0, 8, 16, 32), trained_num_prompts=8,
                       trained_max_new_tokens=16)


def matched_dense(moe: ModelConfig) -> ModelConfig:
    """A dense model (every layer a SwiGLU MLP) with the MoE's attention and embedding shapes and
    the FFN width that makes its active parameter count closest to the MoE's (the count is
    linear in the width)."""
    target = presets.param_count(moe)[1]
    at = lambda f: presets.param_count(dataclasses.replace(moe, num_experts=0,
                                                           intermediate_size=f))[1]
    slope = at(2) - at(1)
    width = max(1, round(1 + (target - at(1)) / slope))
    return dataclasses.replace(moe, num_experts=0, intermediate_size=width)


def trainer_config(cfg: ModelConfig) -> ModelConfig:
    """The trainer's numerics: float32 everywhere and a dropless MoE dispatch (capacity for all
    tokens), so only precision — never dropped tokens — separates it from the engine."""
    moe = {}
    if cfg.is_moe:
        moe = dict(moe_impl="capacity",
                   capacity_factor=max(cfg.capacity_factor,
                                       cfg.num_experts / cfg.num_experts_per_tok))
    return dataclasses.replace(cfg, dtype="float32", param_dtype="float32", **moe)


# ----------------------------------------------------------------------------- policies


def _sft_dir(work_dir: str, name: str, cfg: ModelConfig, study: StudyConfig) -> str:
    key = json.dumps([dataclasses.asdict(trainer_config(cfg)), study.task_name,
                      study.task_kwargs, study.sft_steps, study.sft_batch_size,
                      study.sft_seq_len, study.sft_learning_rate,
                      derive.stream_seed(study.seed, "sft"),
                      derive.stream_seed(study.seed, "init")], sort_keys=True, default=str)
    return os.path.join(work_dir, f"{name}_sft_{hashlib.sha1(key.encode()).hexdigest()[:10]}")


SFT_TAIL_STEPS = 10  # SFT steps averaged for the recorded end-of-SFT loss / token accuracy


def sft_policy(cfg: ModelConfig, study: StudyConfig, task, tokenizer, directory: str
               ) -> tuple[dict, dict[str, float]]:
    """({"params", "router"} after the study's short SFT, resumed/reused from ``directory``;
    its loss, token accuracy and dropped share averaged over the last `SFT_TAIL_STEPS` steps).
    The SFT runs the trainer's numerics (`trainer_config`: float32, dropless)."""
    sft_cfg = sft.SFTConfig(seq_len=study.sft_seq_len, batch_size=study.sft_batch_size,
                            num_steps=study.sft_steps,
                            seed=derive.stream_seed(study.seed, "sft"), log_every=25)
    optim_cfg = optim.OptimConfig(learning_rate=study.sft_learning_rate,
                                  warmup_steps=min(20, study.sft_steps), clip_norm=1.0)
    state = sft.train_sft(Transformer(trainer_config(cfg)), task, tokenizer, directory, sft_cfg,
                          optim_cfg,
                          checkpoint_lib.CheckpointConfig(save_every=10**6, async_save=False),
                          rng=jax.random.key(derive.stream_seed(study.seed, "init")))
    return {"params": state["params"], "router": state["router"]}, sft_tail(directory)


def sft_tail(directory: str) -> dict[str, float]:
    """Mean over the last `SFT_TAIL_STEPS` steps of the SFT's loss, token accuracy and (MoE)
    dropped share, from its metrics.jsonl."""
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    tail = [r for r in records if "sft/loss" in r][-SFT_TAIL_STEPS:]
    out = {"steps": int(tail[-1]["step"])}
    for key in ("sft/loss", "sft/token_accuracy", "moe/dropped_frac"):
        values = [r[key] for r in tail if key in r]
        if values:
            out[key] = float(np.mean(values))
    return out


def workdir_evals(workdir: str, step: int) -> dict[str, Any]:
    """The RL run's held-out greedy pass@1 at its first evaluation and its last one up to
    ``step`` (the policy measured), from its metrics.jsonl, so the trained policy is described
    by committed numbers."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [(r["step"], r["eval/pass@1"]) for r in records
             if "eval/pass@1" in r and r["step"] <= step]
    return {"rl_steps": step,
            "pass@1_first": evals[0][1] if evals else None,
            "pass@1_last": evals[-1][1] if evals else None,
            "pass@1_steps": [evals[0][0], evals[-1][0]] if evals else None}


def load_workdir_policies(workdir: str, step: int | None = None
                          ) -> tuple[ModelConfig, dict, dict, dict, int]:
    """(model config, task section, RL-trained policy at checkpoint ``step`` (default the
    newest), its SFT start, that step) of an RL workdir."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in config["model"].items() if k in fields})
    target = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0),
                                                          np.zeros((1, 8), np.int32)))
    target = {"params": target["params"], "router": target.get("router", {})}
    if step is None:
        with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
            step = ckpt.latest_step()
    trained = sft.load_policy(workdir, target, step)
    start = sft.load_policy(os.path.join(workdir, "sft"), target)
    return cfg, config["task"], trained, start, step


# ----------------------------------------------------------------------------- measurement


def prompts(task, tokenizer, num: int) -> list[np.ndarray]:
    """The task's fixed evaluation prompts (`evaluate.eval_records`): held out from every SFT/RL
    draw by construction and the same for every seed."""
    return [np.asarray(r["prompt_tokens"], np.int32)
            for r in evaluate.eval_records(task, tokenizer, num)]


def rollouts(cfg: ModelConfig, variables: dict, precision: InferencePrecision,
             prompt_tokens: list[np.ndarray], *, stop_id: int, max_new_tokens: int,
             max_len: int, num_slots: int, temperature: float, seed: int) -> list[Request]:
    """One response per prompt; request i samples with key ``seed + i``."""
    engine = Engine.from_model(cfg, variables,
                               EngineConfig(num_slots=num_slots, max_len=max_len,
                                            decode_chunk=16, record_expert_ids=True),
                               precision, moe_impl="capacity")
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                              stop_token_ids=(stop_id,))
    engine.add([Request(f"r{i}", p, sampling, seed=seed + i)
                for i, p in enumerate(prompt_tokens)])
    finished = []
    while True:
        out = engine.step()
        finished.extend(out.finished)
        if out.num_in_flight == 0:
            return finished


def measure(cfg: ModelConfig, variables: dict,
            requests: list[Request]) -> dict[str, np.ndarray]:
    """Per response token: signed Δ = log π_train − log π_infer, its position, its response,
    and (MoE) whether its expert set differs per MoE layer [n, L_moe]."""
    requests = [r for r in requests if r.num_generated > 0]
    tcfg = trainer_config(cfg)
    forward = reference.model_forward(Transformer(tcfg), record_expert_ids=tcfg.is_moe)
    views = probe.trainer_view(forward, variables, requests)
    out = {"dlogp": np.concatenate([lp - r.logprobs for (lp, _), r in zip(views, requests)]),
           "pos": np.concatenate([np.arange(r.num_generated) for r in requests]),
           "lengths": np.asarray([r.num_generated for r in requests]),
           "response": np.concatenate([np.full(r.num_generated, i)
                                       for i, r in enumerate(requests)])}
    if tcfg.is_moe:
        engine_NLK = np.sort(np.concatenate([r.expert_ids for r in requests]), axis=-1)
        trainer_NLK = np.sort(np.concatenate([e for _, e in views]), axis=-1)
        out["flip_NL"] = np.any(engine_NLK != trainer_NLK, axis=-1)
    return out


def bootstrap_ci(values: np.ndarray, group: np.ndarray, num: int = 1000,
                 seed: int = 0) -> list[float]:
    """95% interval of the token-mean of ``values`` when whole responses (``group``) are
    resampled: tokens of one response are correlated, so responses are the unit."""
    sums = np.bincount(group, weights=values)
    counts = np.bincount(group)
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(num, len(sums)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return [float(x) for x in np.quantile(means, [0.025, 0.975])]


def summarize(m: dict[str, np.ndarray], edges: tuple[int, ...]) -> dict[str, Any]:
    """JSON-able numbers of one arm (|Δ| statistics, by position bucket, flips by layer)."""
    a = np.abs(m["dlogp"])
    log_k = m["dlogp"]  # log of IcePop's k = π_train / π_infer
    masked = (log_k < np.log(ICEPOP_ALPHA)) | (log_k > np.log(ICEPOP_BETA))
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (m["pos"] >= lo) & (m["pos"] < hi)
        n = int(sel.sum())
        buckets.append({"lo": lo, "hi": hi, "tokens": n,
                        "mean": float(a[sel].mean()) if n else None,
                        "max": float(a[sel].max()) if n else None})
    out = {"tokens": int(a.size), "mean_response_len": float(m["lengths"].mean()),
           "abs_dlogp_mean": float(a.mean()),
           "abs_dlogp_mean_ci95": bootstrap_ci(a, m["response"]),
           "abs_dlogp_median": float(np.median(a)),
           "abs_dlogp_p99": float(np.quantile(a, 0.99)), "abs_dlogp_max": float(a.max()),
           "icepop_masked_frac": float(masked.mean()), "by_position": buckets}
    if "flip_NL" in m:
        out["expert_flip_frac_by_layer"] = [float(x) for x in m["flip_NL"].mean(axis=0)]
        out["expert_flip_frac"] = float(m["flip_NL"].mean())
        out["token_any_flip_frac"] = float(m["flip_NL"].any(axis=1).mean())
    return out


# ----------------------------------------------------------------------------- figures


def _hist_bins(arrays) -> np.ndarray:
    vals = np.concatenate([np.abs(a) for a in arrays])
    hi = max(float(vals.max()), 1e-3) * 1.5
    return np.concatenate([[0.0], np.logspace(-7, np.log10(hi), 50)])


def plot_all(out_dir: str, raw: dict[str, dict], results: dict[str, Any],
             edges: tuple[int, ...]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = {"moe": "tab:red", "dense": "tab:blue"}
    prec_styles = {"fp32": ":", "bf16": "-", "fp8": "--"}

    # Fig 1: distribution of |Δlogp| (log-spaced bins; the first bin holds exact zeros).
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    arms = [k for k in raw if not k.startswith("rl_")]
    bins = _hist_bins([raw[k]["dlogp"] for k in arms])
    for ax, prec in zip(axes, PRECISIONS):
        for model in ("moe", "dense"):
            key = f"{model}/{prec}"
            if key not in raw:
                continue
            a = np.maximum(np.abs(raw[key]["dlogp"]), 1e-7)
            s = results["arms"][key]
            ax.hist(a, bins=bins[1:], histtype="step", color=styles[model], lw=1.5,
                    label=f"{model}: mean {s['abs_dlogp_mean']:.2e}, max {s['abs_dlogp_max']:.2e}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"engine {prec} vs trainer fp32")
        ax.set_xlabel("|log p_infer − log p_train| (zeros drawn at 1e-7)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("tokens")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "fig1_abs_dlogp_hist.png"))

    # Fig 2: growth with position (bucketed mean and max). The fp32 control (~1e-6, Fig 1)
    # is left out so the linear axis resolves the bf16/fp8 arms.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    mids = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    for key in arms:
        model, prec = key.split("/")
        if prec == "fp32":
            continue
        b = results["arms"][key]["by_position"]
        for ax, stat in zip(axes, ("mean", "max")):
            xs = [x for x, r in zip(mids, b) if r[stat] is not None]
            ys = [r[stat] for r in b if r[stat] is not None]
            ax.plot(xs, ys, prec_styles[prec], color=styles[model], marker="o",
                    label=f"{model} {prec}")
    for ax, stat in zip(axes, ("mean", "max")):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"response position (bucket mid; edges {list(edges)})")
        ax.set_ylabel(f"{stat} |Δlogp| in bucket")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "fig2_position.png"))

    # Fig 3: expert-flip fraction vs MoE layer depth.
    fig, ax = plt.subplots(figsize=(6, 4))
    for prec in PRECISIONS:
        s = results["arms"].get(f"moe/{prec}")
        if s and "expert_flip_frac_by_layer" in s:
            f = s["expert_flip_frac_by_layer"]
            ax.plot(np.arange(1, len(f) + 1), f, prec_styles[prec], color="tab:red", marker="o",
                    label=f"MoE, engine {prec}")
    ax.set_xlabel("MoE layer (1 = shallowest)")
    ax.set_ylabel("fraction of tokens whose expert set differs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "fig3_flips_vs_depth.png"))

    # Fig 4: RL-trained policy vs its SFT start.
    rl = {k: v for k, v in raw.items() if k.startswith("rl_")}
    if rl:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        colors = {"rl_start": "tab:gray", "rl_trained": "tab:green"}
        bins = _hist_bins([v["dlogp"] for v in rl.values()])
        for key, m in rl.items():
            policy, prec = key.split("/")
            s = results["arms"][key]
            axes[0].hist(np.maximum(np.abs(m["dlogp"]), 1e-7), bins=bins[1:], histtype="step",
                         color=colors[policy], ls=prec_styles[prec],
                         label=f"{policy} {prec}: mean {s['abs_dlogp_mean']:.2e}")
            tedges = results["trained"]["bucket_edges"]
            tmids = [(lo + hi) / 2 for lo, hi in zip(tedges[:-1], tedges[1:])]
            b = s["by_position"]
            axes[1].plot([x for x, r in zip(tmids, b) if r["mean"] is not None],
                         [r["mean"] for r in b if r["mean"] is not None], prec_styles[prec],
                         color=colors[policy], marker="o", label=f"{policy} {prec}")
            if "expert_flip_frac_by_layer" in s:
                f = s["expert_flip_frac_by_layer"]
                axes[2].plot(np.arange(1, len(f) + 1), f, prec_styles[prec], marker="o",
                             color=colors[policy], label=f"{policy} {prec}")
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("|Δlogp|")
        axes[1].set_xlabel("response position (bucket mid)")
        axes[1].set_ylabel("mean |Δlogp|")
        axes[1].set_ylim(bottom=0)
        axes[2].set_xlabel("MoE layer")
        axes[2].set_ylabel("expert-flip fraction")
        for ax in axes:
            ax.legend(fontsize=8)
        fig.suptitle(f"RL-trained vs SFT start ({results['trained']['workdir']})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "fig4_training.png"))
    plt.close("all")
    return paths


def _ratio(results: dict[str, Any], num: str, den: str, stat: str) -> str:
    a, b = results["arms"].get(num), results["arms"].get(den)
    if a is None or b is None or not b[stat]:
        return "–"
    return f"×{a[stat] / b[stat]:.2f}"


def headline(results: dict[str, Any]) -> list[str]:
    """The setup and ratio numbers REPRODUCING.md quotes besides the tables."""
    lines = ["Models and their SFT (mean of the last SFT steps; dropped = share of expert "
             "assignments the SFT's MoE dispatch dropped):", ""]
    for name, m in results["models"].items():
        line = (f"- {name}: {m['active_params']:,} active / {m['total_params']:,} total "
                f"parameters, FFN width {m['intermediate_size']}, {m['num_moe_layers']} MoE "
                "layers")
        if "sft" in m:  # results.json written before the SFT tail was recorded lack it
            line += f"; SFT {m['sft']['steps']} steps: " + ", ".join(
                f"{k.split('/')[-1]} {v:.3f}" for k, v in m["sft"].items() if k != "steps")
        lines.append(line)
    lines += ["", "Ratios (mean / p99 / max of \|Δlogp\|):", ""]
    pairs = [("moe/bf16", "dense/bf16"), ("moe/fp8", "moe/bf16"), ("rl_trained/bf16", "rl_start/bf16"),
             ("rl_trained/fp8", "rl_start/fp8")]
    for num, den in pairs:
        if num in results["arms"] and den in results["arms"]:
            cells = " / ".join(_ratio(results, num, den, stat) for stat in (
                "abs_dlogp_mean", "abs_dlogp_p99", "abs_dlogp_max"))
            lines.append(f"- {num} vs {den}: {cells}")
    lines += ["", "IcePop-masked tokens per arm (k of n; where k = 0, the one-sided 95% upper "
              "bound on the masked rate, 1 − 0.05^(1/n) ≈ 3/n):", ""]
    for key, a in results["arms"].items():
        k = round(a["icepop_masked_frac"] * a["tokens"])
        bound = f", rate < {1e3 * (1 - 0.05 ** (1 / a['tokens'])):.2f}‰" if k == 0 else ""
        lines.append(f"- {key}: {k} of {a['tokens']}{bound}")
    if "trained" in results:
        t = results["trained"]
        line = (f"Trained policy: {t['workdir']} ({t['task']}, {t['model_active_params']:,} "
                "active parameters)")
        if t.get("pass@1_steps"):
            first, last = t["pass@1_steps"]
            line += (f", checkpoint of RL step {t['rl_steps']}; held-out greedy pass@1 "
                     f"{t['pass@1_first']:.3f} (step {first}) → {t['pass@1_last']:.3f} "
                     f"(step {last})")
        lines += ["", line + "."]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}"
                                          for k, v in results.get("timings_s", {}).items())]
    return lines


def markdown_tables(results: dict[str, Any]) -> str:
    """results.json as markdown: the per-arm table, |Δlogp| by position, expert flips by layer
    and the `headline` numbers (REPRODUCING.md quotes them)."""
    fmt = lambda x: "–" if x is None else f"{x:.2e}"
    lines = ["| arm | tokens | mean len | mean \\|Δlogp\\| [95% CI, responses resampled] "
             "| median | p99 | max | IcePop-masked | expert-flip frac (mean over layers) "
             "| tokens with any flip |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, a in results["arms"].items():
        flips = a.get("expert_flip_frac")
        any_flip = a.get("token_any_flip_frac")
        lines.append(
            f"| {key} | {a['tokens']} | {a['mean_response_len']:.1f} | {fmt(a['abs_dlogp_mean'])} "
            f"[{fmt(a['abs_dlogp_mean_ci95'][0])}, {fmt(a['abs_dlogp_mean_ci95'][1])}] "
            f"| {fmt(a['abs_dlogp_median'])} | {fmt(a['abs_dlogp_p99'])} "
            f"| {fmt(a['abs_dlogp_max'])} | {a['icepop_masked_frac']:.4f} "
            f"| {'–' if flips is None else f'{flips:.4f}'} "
            f"| {'–' if any_flip is None else f'{any_flip:.4f}'} |")
    lines += ["", "Mean (max) \\|Δlogp\\| by response position:", ""]
    for key, a in results["arms"].items():
        cells = [f"[{b['lo']},{b['hi']}): {fmt(b['mean'])} ({fmt(b['max'])}, n={b['tokens']})"
                 for b in a["by_position"]]
        lines.append(f"- {key}: " + "; ".join(cells))
    lines += ["", "Expert-flip fraction by MoE layer (shallow → deep):", ""]
    for key, a in results["arms"].items():
        if "expert_flip_frac_by_layer" in a:
            lines.append(f"- {key}: " + ", ".join(f"{x:.4f}"
                                                   for x in a["expert_flip_frac_by_layer"]))
    lines += [""] + headline(results)
    return "\n".join(lines) + "\n"


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    return path


# ----------------------------------------------------------------------------- driver


def run_study(study: StudyConfig, out_dir: str, work_dir: str,
              trained_workdir: str = "", trained_step: int | None = None) -> dict[str, Any]:
    """Runs every arm, writes results.json and the figures into ``out_dir``; returns results.
    ``trained_step``: the RL checkpoint of ``trained_workdir`` measured (default its newest)."""
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = get_tokenizer("byte")
    task = tasks.get(study.task_name, **dict(study.task_kwargs))
    dense = matched_dense(study.moe)
    models = {"moe": study.moe, "dense": dense}
    results: dict[str, Any] = {
        "study": json.loads(json.dumps(dataclasses.asdict(study), default=str)),
        "models": {name: {"total_params": presets.param_count(c)[0],
                          "active_params": presets.param_count(c)[1],
                          "intermediate_size": c.intermediate_size,
                          "num_moe_layers": c.num_moe_layers}
                   for name, c in models.items()},
        "arms": {}, "timings_s": {}}
    raw: dict[str, dict] = {}
    prompt_tokens = prompts(task, tokenizer, study.num_prompts)
    gen_kw = dict(stop_id=tokenizer.eos_id, max_new_tokens=study.max_new_tokens,
                  max_len=study.max_len, num_slots=study.num_slots,
                  temperature=study.temperature,
                  seed=derive.stream_seed(study.seed, "sampling"))
    results["seed_streams"] = {name: derive.stream_seed(study.seed, name)
                               for name in ("init", "sft", "sampling")}
    for name, cfg in models.items():
        t0 = time.perf_counter()
        variables, results["models"][name]["sft"] = sft_policy(
            cfg, study, task, tokenizer, _sft_dir(work_dir, name, cfg, study))
        results["timings_s"][f"{name}/sft"] = time.perf_counter() - t0
        for prec_name, precision in PRECISIONS.items():
            if prec_name == "fp8" and not cfg.is_moe:
                continue  # fp8 touches routed-expert weights only: identical to bf16 here
            t0 = time.perf_counter()
            reqs = rollouts(cfg, variables, precision, prompt_tokens, **gen_kw)
            raw[f"{name}/{prec_name}"] = measure(cfg, variables, reqs)
            results["arms"][f"{name}/{prec_name}"] = summarize(raw[f"{name}/{prec_name}"],
                                                               study.bucket_edges)
            results["timings_s"][f"{name}/{prec_name}"] = time.perf_counter() - t0
            print(f"{name}/{prec_name}: " + json.dumps(
                {k: v for k, v in results["arms"][f"{name}/{prec_name}"].items()
                 if k != "by_position"}), flush=True)

    if trained_workdir:
        t0 = time.perf_counter()
        cfg, task_section, trained, start, step = load_workdir_policies(trained_workdir,
                                                                        trained_step)
        rl_task = tasks.get(task_section["name"], **dict(task_section.get("kwargs") or {}))
        rl_prompts = prompts(rl_task, tokenizer, study.trained_num_prompts)
        edges = tuple(e for e in study.bucket_edges if e < study.trained_max_new_tokens) + (
            study.trained_max_new_tokens,)
        results["trained"] = {"workdir": trained_workdir, "task": task_section["name"],
                              "bucket_edges": list(edges),
                              "model_active_params": presets.param_count(cfg)[1],
                              **workdir_evals(trained_workdir, step)}
        for policy, variables in (("rl_start", start), ("rl_trained", trained)):
            for prec_name in ("bf16", "fp8"):
                reqs = rollouts(cfg, variables, PRECISIONS[prec_name], rl_prompts,
                                **{**gen_kw, "max_new_tokens": study.trained_max_new_tokens,
                                   "max_len": max(study.max_len, 128)})
                key = f"{policy}/{prec_name}"
                raw[key] = measure(cfg, variables, reqs)
                results["arms"][key] = summarize(raw[key], edges)
                print(f"{key}: " + json.dumps({k: v for k, v in results["arms"][key].items()
                                               if k != "by_position"}), flush=True)
        results["timings_s"]["trained_vs_start"] = time.perf_counter() - t0

    results["figures"] = [os.path.basename(p)
                          for p in plot_all(out_dir, raw, results, study.bucket_edges)]
    results["timings_s"]["total"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_tables(results))
    return results


FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "local", ["local", "tiny"], "study size (get_config variant)")
flags.DEFINE_string("out_dir", "experiments/figures/mismatch_anatomy",
                    "where results.json and the PNGs go")
flags.DEFINE_string("work_dir", "/tmp/rj_mismatch_anatomy",
                    "SFT checkpoints of the study's models (reused when the config matches)")
flags.DEFINE_string("from_results", "",
                    "a results.json: write summary.md beside it from it and print it (runs "
                    "nothing)")
flags.DEFINE_integer("trained_step", None,
                     "checkpoint step of --trained_workdir to measure (default: its newest)")
flags.DEFINE_string("trained_workdir", None,
                    f"RL workdir for 'after RL vs at start' (default {DEFAULT_TRAINED_WORKDIR} "
                    "if it exists; '' skips)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint item at INFO
    if FLAGS.from_results:
        with open(FLAGS.from_results) as f:
            summary = markdown_tables(json.load(f))
        with open(os.path.join(os.path.dirname(FLAGS.from_results), "summary.md"), "w") as f:
            f.write(summary)
        print(summary, end="")
        return
    trained = FLAGS.trained_workdir
    if trained is None:
        trained = DEFAULT_TRAINED_WORKDIR if os.path.isdir(
            os.path.join(DEFAULT_TRAINED_WORKDIR, "checkpoints")) else ""
    results = run_study(get_config(FLAGS.size), FLAGS.out_dir, FLAGS.work_dir, trained,
                        FLAGS.trained_step)
    print(json.dumps(results["timings_s"], indent=1))


if __name__ == "__main__":
    app.run(main)
