"""Prompt lengths of a task checked against the run's limits before anything trains.

Two limits bite long after start-up otherwise:

  * RL / evaluation: the scheduler needs ``len(prompt) + 1 <= scheduler.max_seq_len`` (room
    for one response token; ``scheduler.max_seq_len <= engine.max_len``) and raises at the
    first prompt that breaks it, which is after the whole SFT stage.
  * SFT: an example longer than ``sft.seq_len`` is cut to it (`sft.pack_next_fit`); one whose
    chat prompt alone has more than ``sft.seq_len`` tokens keeps no response token, so it
    trains nothing, silently.

`check_task_lengths` tokenizes the prompts the run will see: every row of a file task (up to
MAX_FILE_ROWS), the first ``num_scanned`` indices of a generated task under each seed the run
draws with (training, evaluation, SFT), and the held-out split. A violation is a ConfigError naming
the field to raise, the longest prompt found and how many are too long.
"""
from __future__ import annotations

from typing import Any, Iterable

from ring_jax import config as config_lib

DEFAULT_NUM_SCANNED = 256  # problems per seed of a generated task
MAX_FILE_ROWS = 100_000  # rows of a file task (all of them, up to this)


def _draws(task: Any, seeds: Iterable[int], num_scanned: int) -> list[tuple[int, int]]:
    """(index, seed) pairs to scan. A file task (it has ``num_examples``) ignores the seed:
    each of its rows once. A generated task is unbounded: the first ``num_scanned`` indices
    under every seed the run draws with."""
    num_rows = getattr(task, "num_examples", None)
    if num_rows is not None:
        return [(i, 0) for i in range(min(num_rows, MAX_FILE_ROWS))]
    return [(i, seed) for seed in dict.fromkeys(seeds) for i in range(num_scanned)]


def prompt_lengths(task: Any, tokenizer: Any, seeds: Iterable[int], thinking: bool,
                   num_scanned: int = DEFAULT_NUM_SCANNED) -> list[tuple[int, int]]:
    """(index, chat-prompt tokens) of the scanned problems of ``task``."""
    out = []
    for index, seed in _draws(task, seeds, num_scanned):
        record = task.sample(index, seed)
        chat = tokenizer.apply_chat_template(record.prompt, thinking=thinking)
        out.append((index, len(tokenizer.encode(chat))))
    return out


def _too_long(lengths: Iterable[tuple[str, int, int]], limit: int
              ) -> tuple[int, int, tuple[str, int, int] | None]:
    """(number too long, number scanned, the longest (split, index, length))."""
    lengths = list(lengths)
    longest = max(lengths, key=lambda x: x[2], default=None)
    return sum(n > limit for _, _, n in lengths), len(lengths), longest


def check_task_lengths(task: Any, tokenizer: Any, *, seeds: Iterable[int], thinking: bool,
                       max_seq_len: int, sft_seq_len: int = 0, sft_seed: int = 0,
                       sft_thinking: bool = True,
                       num_scanned: int = DEFAULT_NUM_SCANNED) -> None:
    """Raises ConfigError if a scanned prompt leaves no room for a response within
    ``max_seq_len`` (scheduler.max_seq_len), or (``sft_seq_len`` > 0) if a scanned SFT
    example's prompt alone exceeds ``sft_seq_len`` tokens."""
    splits = [("train", task)]
    if (held_out := task.held_out()) is not task:
        splits.append(("held-out", held_out))
    rl = [(name, i, n) for name, t in splits
          for i, n in prompt_lengths(t, tokenizer, seeds, thinking, num_scanned)]
    count, scanned, longest = _too_long(rl, max_seq_len - 1)
    if count:
        config_lib.fail("scheduler.max_seq_len", max_seq_len,
                        f"{count} of {scanned} scanned prompts leave no room for a response: "
                        f"the longest ({longest[0]} index {longest[1]}) has {longest[2]} "
                        f"tokens; raise scheduler.max_seq_len and engine.max_len above it, or "
                        "use shorter problems")
    if sft_seq_len:
        examples = [("train", i, n) for i, n in prompt_lengths(task, tokenizer, (sft_seed,),
                                                               sft_thinking, num_scanned)]
        count, scanned, longest = _too_long(examples, sft_seq_len)
        if count:
            config_lib.fail("sft.seq_len", sft_seq_len,
                            f"{count} of {scanned} scanned SFT examples would be cut to "
                            f"nothing (the prompt alone fills the row, no response token is "
                            f"left to learn): the longest prompt (index {longest[1]}) has "
                            f"{longest[2]} tokens; raise sft.seq_len above it")
