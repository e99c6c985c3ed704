"""Base for tasks read from a local JSONL (or parquet, if pyarrow is installed) file.

Every row is validated when the task is built (at config time, before anything compiles):
the file must be UTF-8 without a byte-order mark, each non-blank line one JSON object, and
each row must have the keys and types its task needs (`FileTask.row_problem`). The error
names the file, each bad line and the problem (``task.path='x.jsonl' is invalid: line 3:
missing 'answer'; line 7: malformed JSON (...)``), not the first crash at SFT step 1.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
import zlib
from typing import Any

from ring_jax.config import check, fail
from ring_jax.data.tasks.base import PromptRecord, Task

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "bundled")


MAX_LISTED_PROBLEMS = 5  # problems named in one error line (the rest are counted)


def _problems_error(path: str, problems: list[str]) -> None:
    more = len(problems) - MAX_LISTED_PROBLEMS
    fail("path", path, "; ".join(problems[:MAX_LISTED_PROBLEMS])
         + (f"; ... and {more} more" if more > 0 else ""))


def read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) for every row: location is "line N" (1-based, blank lines counted) of a
    .jsonl file or "row N" of a parquet file. Every line is checked: UTF-8 without a
    byte-order mark, one JSON object per line; the error names the file and each bad line."""
    if path.endswith(".jsonl"):
        rows, problems = [], []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"line {number}"
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    problems.append(f"{where}: starts with a UTF-8 byte-order mark (BOM); "
                                    "save the file as UTF-8 without BOM")
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append(f"{where}: not UTF-8 (byte {e.start + 1}: "
                                    f"{raw[e.start:e.start + 1]!r})")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    problems.append(f"{where}: expected a JSON object, found "
                                    f"{type(row).__name__}")
                    continue
                rows.append((where, row))
        if problems:
            _problems_error(path, problems)
        if not rows:
            fail("path", path, "has no rows (an empty file)")
        return rows
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            fail("path", path, "parquet files need pyarrow installed (or convert to .jsonl)")
        rows = [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist(), 1)]
        if not rows:
            fail("path", path, "has no rows (an empty file)")
        return rows
    fail("path", path, "must end with .jsonl or .parquet")


def check_field(row: dict[str, Any], key: str, types: tuple[type, ...], *,
                required: bool = True) -> str | None:
    """The problem with ``row[key]`` (missing, or not one of ``types``; bools are not
    numbers), or None."""
    if key not in row or row[key] is None:
        return f"missing {key!r}" if required else None
    value = row[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        allowed = " or ".join(_json_name(t) for t in types)
        return f"{key!r} must be {allowed}, found {_json_name(type(value))} {value!r:.40}"
    return None


def _json_name(t: type) -> str:
    return _JSON_NAMES.get(t, t.__name__)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list",
               dict: "an object", bool: "a boolean", type(None): "null"}


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

    def __post_init__(self):
        super().__post_init__()
        check(os.path.exists(self.resolved_path), "path", self.path, "must be an existing file")
        check(self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction,
              "must be < 1 (training needs rows)")
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
        located = read_rows(self.resolved_path)
        problems = [f"{where}: {problem}" for where, row in located
                    if (problem := self.row_problem(row))]
        if problems:  # every row is checked here, not when SFT or a reward first reads it
            _problems_error(self.resolved_path, problems)
        rows = [row for _, row in located]
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
    def row_problem(self, row: dict[str, Any]) -> str | None:
        """What is wrong with one row for this task (a missing key, a wrong type), or None."""

    @abc.abstractmethod
    def _from_row(self, row: dict[str, Any]) -> tuple[str, str, str | None, dict]:
        """-> (prompt, worked answer text, thoughts or None, JSON-able metadata for score)."""
