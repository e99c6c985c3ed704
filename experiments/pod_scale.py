"""Pod-scale shapes for the ahead-of-time planner (`python -m ring_jax.plan`, BUILD.md "Will it
fit?"): a Ling 2.0 preset at the issue's RL shapes, with nothing a pod would not run.

    python -m ring_jax.plan --config=experiments/pod_scale.py:ling_mini_2 \
        --topology=v5p:4x4x4 --mesh=fsdp=4,expert=16 --program=all --num_layers=2

Args: a preset name (tiny, small, ling_mini_2, ling_flash_2, ling_1t; default ling_mini_2),
then optional ``batch=B`` (rows per RL step), ``seq=T`` (tokens per row), ``slots=S`` (engine
decode batch), ``cache=C`` (engine KV-cache length). Not a training recipe: the task and the
schedules are the defaults; any field can be overridden (``--config.model.moe_impl=capacity``).
"""
import ml_collections

from ring_jax.train.experiment import complete, model_section, parse_config_arg

PRESETS = ("tiny", "small", "ling_mini_2", "ling_flash_2", "ling_1t")


def get_config(arg: str = "ling_mini_2") -> ml_collections.ConfigDict:
    flags, values = parse_config_arg(arg, set(PRESETS), {"batch", "seq", "slots", "cache"})
    if len(flags) > 1:
        raise ValueError(f"one preset at most, got {sorted(flags)}")
    preset = next(iter(flags), "ling_mini_2")
    batch, seq = int(values.get("batch", 64)), int(values.get("seq", 4096))
    slots, cache = int(values.get("slots", 256)), int(values.get("cache", 8192))
    c = ml_collections.ConfigDict()
    c.model = model_section(preset, max_position_embeddings=max(seq, cache, 4096))
    c.scheduler = dict(mode="sync", group_size=8, batch_size=batch, max_seq_len=seq,
                       max_active_requests=max(batch, slots))
    c.engine = dict(num_slots=slots, max_len=max(seq, cache), decode_chunk=16)
    c.engine_moe_impl = "ragged"
    c.precision = dict(dtype="bfloat16")
    c.rl = dict(num_minibatches=1, logprob_chunk=512)
    c.mesh = dict(data=1, fsdp=-1)
    return complete(c)
