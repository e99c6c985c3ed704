"""The rollout engine: KV-cache generation with continuous batching, resumable requests,
per-token inference log-probs / versions / expert ids, an inference precision policy, weight
sync, a naive reference generator and a training–inference mismatch probe.

    from ring_jax.rollout import Engine, EngineConfig, InferencePrecision, Request, SamplingParams
    engine = Engine.from_model(model_cfg, variables, EngineConfig(num_slots=64, max_len=4096),
                               InferencePrecision("bfloat16"))
    engine.add([Request("r0", prompt_tokens, SamplingParams(temperature=1.0), seed=0)])
    out = engine.step(token_budget=16384)       # out.finished, out.num_new_tokens
    unfinished = engine.drain()                 # resume later with engine.add(unfinished)
    engine.load_weights(new_variables, version=1)
"""
from ring_jax.rollout.engine import Engine, EngineConfig, RequestError
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.probe import MismatchReport, probe_mismatch
from ring_jax.rollout.types import (FINISH_LENGTH, FINISH_STOP, EngineProtocol, Request,
                                    SamplingParams, StepOutput)

__all__ = ["Engine", "EngineConfig", "RequestError", "InferencePrecision", "MismatchReport",
           "probe_mismatch", "EngineProtocol", "Request", "SamplingParams", "StepOutput",
           "FINISH_LENGTH", "FINISH_STOP"]
