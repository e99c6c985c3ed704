"""Pod-scale shapes for the ahead-of-time planner (`python -m ring_jax.plan`, BUILD.md "Will it
fit?"): a Ling 2.0 preset at the issue's RL shapes, with the memory levers that make its RL step
fit and nothing a pod would not run.

    python -m ring_jax.plan --config=experiments/pod_scale.py:ling_flash_2 \
        --topology=v5p:8x8x8 --mesh=fsdp=8,expert=64 --program=rl_step --num_layers=3

Args: a preset name (tiny, small, ling_mini_2, ling_flash_2, ling_1t; default ling_mini_2),
then optional ``batch=B`` (rows per RL step; default 64, 512 for the two pod-sized presets: one
4096-token row per chip of a v5p-512), ``seq=T`` (tokens per row), ``slots=S`` (engine decode
batch), ``cache=C`` (engine KV-cache length). Not a training recipe: the task and the schedules
are the defaults; any field can be overridden (``--config.model.moe_impl=capacity``).

The recipe (`POD_LEVERS`, each measured by the planner in BUILD.md "Will it fit?"): every block
rematerialised (``model.remat_policy=full``: the backward keeps one block input per layer),
attention 512 queries at a time (``model.attention_chunk``: float32 scores [512, T], never
[T, T]), the ragged expert dispatch over chunks of the local tokens
(``model.moe_token_chunk``: its all-gathered, K-times repeated [P·chunk·K, D] buffers for one
chunk at a time; 64 for Ling-1T, whose D = 8192 doubles them) and the MoE layers as one scan
(``model.scan_layers``: one copy of the layer's code and one placement of its buffers, so
memory grows by the same bytes per layer). All four are exact. With them every preset's whole
RL step compiles to fit (per chip): Ling-mini 6.74 GiB on v6e-64 and 6.97 GiB on v5p-64,
Ling-flash 14.3 GiB and Ling-1T 51.1 GiB on v5p-512 (BUILD.md). The model presets
themselves keep the CPU defaults (none of the four), and ``tiny``/``small`` get none here
either (`--config.model.*` adds them).
"""
import ml_collections

from ring_jax.train.experiment import complete, model_section, parse_config_arg

PRESETS = ("tiny", "small", "ling_mini_2", "ling_flash_2", "ling_1t")
_LEVERS = dict(remat_policy="full", attention_chunk=512, moe_token_chunk=512, scan_layers=True)
POD_LEVERS = {"ling_mini_2": _LEVERS, "ling_flash_2": _LEVERS,
              "ling_1t": {**_LEVERS, "moe_token_chunk": 64}}
POD_BATCH = {"ling_flash_2": 512, "ling_1t": 512}  # default rows per RL step (else 64)


def get_config(arg: str = "ling_mini_2") -> ml_collections.ConfigDict:
    flags, values = parse_config_arg(arg, set(PRESETS), {"batch", "seq", "slots", "cache"})
    if len(flags) > 1:
        raise ValueError(f"one preset at most, got {sorted(flags)}")
    preset = next(iter(flags), "ling_mini_2")
    batch, seq = int(values.get("batch", POD_BATCH.get(preset, 64))), int(values.get("seq", 4096))
    slots, cache = int(values.get("slots", 256)), int(values.get("cache", 8192))
    c = ml_collections.ConfigDict()
    c.model = model_section(preset, max_position_embeddings=max(seq, cache, 4096),
                            **POD_LEVERS.get(preset, {}))
    c.scheduler = dict(mode="sync", group_size=8, batch_size=batch, max_seq_len=seq,
                       max_active_requests=max(batch, slots))
    c.engine = dict(num_slots=slots, max_len=max(seq, cache), decode_chunk=16)
    c.engine_moe_impl = "ragged"
    c.precision = dict(dtype="bfloat16")
    c.rl = dict(num_minibatches=1, logprob_chunk=512)
    c.mesh = dict(data=1, fsdp=-1)
    return complete(c)
