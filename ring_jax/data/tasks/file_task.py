"""Base for tasks read from a local JSONL (or parquet, if pyarrow is installed) file."""
from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
from typing import Any

from ring_jax.config import check, fail
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


@dataclasses.dataclass(frozen=True)
class FileTask(Task):
    """Rows of a local file; ``sample(index, seed)`` takes row ``index % num_examples`` whatever
    the seed (the pipeline shuffles by seed). Difficulty knob: ``levels`` keeps only rows whose
    ``level_key`` value is listed (e.g. MATH levels), None keeps all."""
    path: str = ""
    levels: tuple[int, ...] | None = None
    level_key: str = "level"

    def __post_init__(self):
        super().__post_init__()
        check(os.path.exists(self.resolved_path), "path", self.path, "must be an existing file")
        check(len(self.rows) > 0, "levels", self.levels, "must keep at least one row")

    @property
    def resolved_path(self) -> str:
        return self.path or os.path.join(BUNDLED_DIR, self.default_file)

    default_file = ""

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        rows = read_rows(self.resolved_path)
        if self.levels is not None:
            rows = [r for r in rows if r.get(self.level_key) in self.levels]
        return rows

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
