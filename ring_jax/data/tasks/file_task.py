"""Base for tasks read from a local JSONL (or parquet, if pyarrow is installed) file."""
from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
import zlib
from typing import Any

from ring_jax.config import check, check_float, check_one_of, fail
from ring_jax.data.tasks.base import PromptRecord, Task

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "bundled")


def read_rows(path: str) -> list[dict[str, Any]]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            fail("path", path, "parquet files need pyarrow installed (or convert to .jsonl)")
        return pq.read_table(path).to_pylist()
    fail("path", path, "must end with .jsonl or .parquet")


SPLITS = ("train", "eval", "all")


def _row_hash(row: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(row, sort_keys=True, default=str).encode())


@dataclasses.dataclass(frozen=True)
class FileTask(Task):
    """Rows of a local file; ``sample(index, seed)`` takes row ``index % num_examples`` of the
    task's split whatever the seed (the pipeline shuffles by seed), so a held-out evaluation
    cannot come from another seed as it does for generated tasks: the rows are split instead.

    ``eval_fraction`` of the rows (at least one when it is > 0) are held out for evaluation:
    those with the smallest hash of their content, so duplicate rows fall on the same side and
    the split does not depend on the file's order. ``split`` selects "train" (the rest; the
    default), "eval" (the held-out rows; `held_out` gives it) or "all". Difficulty knob:
    ``levels`` keeps only rows whose ``level_key`` value is listed (e.g. MATH levels), None
    keeps all; the split is made after it."""
    path: str = ""
    levels: tuple[int, ...] | None = None
    level_key: str = "level"
    eval_fraction: float = 0.1
    split: str = "train"

    def __post_init__(self):
        super().__post_init__()
        check(os.path.exists(self.resolved_path), "path", self.path, "must be an existing file")
        check_float("eval_fraction", self.eval_fraction, min_value=0.0, max_value=1.0)
        check(self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction,
              "must be < 1 (training needs rows)")
        check_one_of("split", self.split, SPLITS)
        check(len(self._level_rows) > 0, "levels", self.levels, "must keep at least one row")
        check(len(self.rows) > 0, "eval_fraction", self.eval_fraction,
              f"leaves split={self.split!r} of {self.resolved_path} without rows "
              f"({len(self._level_rows)} rows before the split)")

    @property
    def resolved_path(self) -> str:
        return self.path or os.path.join(BUNDLED_DIR, self.default_file)

    default_file = ""

    @functools.cached_property
    def _level_rows(self) -> list[dict[str, Any]]:
        rows = read_rows(self.resolved_path)
        if self.levels is not None:
            rows = [r for r in rows if r.get(self.level_key) in self.levels]
        return rows

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of this task's split, in file order."""
        rows = self._level_rows
        if self.split == "all" or self.eval_fraction == 0:
            return rows if self.split != "eval" else []
        hashes = [_row_hash(r) for r in rows]
        num_eval = max(1, round(self.eval_fraction * len(rows)))
        cutoff = sorted(hashes)[num_eval - 1]  # rows hashing <= cutoff are held out
        held_out = self.split == "eval"
        return [r for r, h in zip(rows, hashes) if (h <= cutoff) == held_out]

    def held_out(self) -> FileTask:
        """The held-out rows (split "eval"); with split="all" or eval_fraction=0 there are none,
        and evaluation uses the training rows themselves."""
        if self.split == "all" or self.eval_fraction == 0:
            return self
        return dataclasses.replace(self, split="eval")

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    def sample(self, index: int, seed: int) -> PromptRecord:
        row = self.rows[index % len(self.rows)]
        prompt, answer, thoughts, metadata = self._from_row(row)
        return PromptRecord(task=self.name, index=index, seed=seed, prompt=prompt,
                            answer=answer, thoughts=thoughts, metadata=metadata)

    def _sample(self, rng, size):  # `sample` is overridden: rows, not random draws
        raise NotImplementedError("file tasks sample rows, see `sample`")

    @abc.abstractmethod
    def _from_row(self, row: dict[str, Any]) -> tuple[str, str, str | None, dict]:
        """-> (prompt, worked answer text, thoughts or None, JSON-able metadata for score)."""
