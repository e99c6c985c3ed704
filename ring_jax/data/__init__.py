"""Where RL prompts come from and how responses are scored (RLVR, PAPER §5).

  tokenizer.py   ByteTokenizer (vocab 262, no files), HFTokenizer (local tokenizer.json), the
                 chat template with a thinking section
  tasks/         Task interface + registry: tasks.get(name, **config); procedural tasks
                 (addition = the quickstart task, multiplication, arithmetic_chain, countdown,
                 reverse, sort, count), math (math-verify), code (sandbox), gym/<name>
  rewards.py     RewardConfig + make_reward_fn(cfg, task, tokenizer): thread-safe
                 (record, response_tokens, finish_reason) -> (reward, info)
  pipeline.py    grain prompt pipelines: prompt_dataset(...) and prompt_iterator(...)
  sandbox.py     run_python / SandboxPool: untrusted code with limits and namespaces
  bundled/       small math and code samples so those tasks run out of the box

Heavy modules (grain pipeline, sandbox, math-verify, reasoning-gym) are imported on use.
"""
from ring_jax.data import tasks
from ring_jax.data.rewards import RewardConfig, make_reward_fn
from ring_jax.data.tasks.base import PromptRecord, RewardResult, Task
from ring_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "PromptRecord", "RewardConfig", "RewardResult", "Task",
           "get_tokenizer", "make_reward_fn", "tasks"]
