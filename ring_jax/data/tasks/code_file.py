"""Code problems from a local JSONL file, scored by running tests in the sandbox.

Row formats (``tests`` is a list):

* function style — ``{"prompt", "fn_name", "tests": [{"input": [args...], "output": value}]}``:
  one sandbox run defines the function from the response and calls it on every input;
* stdio style — ``{"prompt", "tests": [{"input": "stdin text", "output": "stdout text"}]}``:
  one sandbox run per test, output compared token by token (whitespace-insensitive).

Optional ``solution`` (reference code, used as the worked answer) and ``level``.

Expected outputs never enter the sandbox: the harness prints what the function returned and the
host compares, so a response cannot pass by printing a fake "all tests passed" line. The reward
is the fraction of tests passed (``mode="fraction"``) or 1 only if all pass (``mode="all"``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ring_jax.config import ConfigError, check_int, check_one_of
from ring_jax.data.sandbox import SandboxConfig, resolve_isolation, run_python
from ring_jax.data.tasks.file_task import FileTask, check_field

_DEFAULT_SANDBOX = SandboxConfig(wall_timeout_s=10.0, cpu_time_s=2)
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_RESULT_MARKER = "__RING_JAX_RESULTS__"

# Runs inside the sandbox. The solution is exec'd in its own namespace so it cannot clobber
# the harness; inputs come on stdin, results go out as one JSON line after the marker.
_FUNCTION_HARNESS = """\
import json as _json, sys as _sys
_cases = _json.loads(_sys.stdin.read())
_ns = {{"__name__": "__main__"}}
exec(compile({source!r}, "solution.py", "exec"), _ns)
_fn = _ns[{fn_name!r}]
_results = []
for _args in _cases:
    try:
        _results.append(["ok", _fn(*_args)])
    except Exception as _e:
        _results.append(["error", type(_e).__name__])
print()
print({marker!r} + _json.dumps(_results, default=repr))
"""


def extract_code(answer_region: str) -> str | None:
    """The last fenced code block (```python / ```py / ```), or None."""
    blocks = _FENCE_RE.findall(answer_region)
    return blocks[-1] if blocks else None


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(got, float):
        return (isinstance(got, (int, float)) and isinstance(expected, (int, float))
                and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9))
    if isinstance(expected, list) and isinstance(got, list):
        return len(got) == len(expected) and all(map(_same, got, expected))
    return got == expected


@dataclasses.dataclass(frozen=True)
class CodeFileTask(FileTask):
    mode: str = "fraction"
    # A SandboxConfig, or (from an experiment config) a dict of fields to change in the default:
    # ``task.kwargs.sandbox = dict(isolation="rlimits")`` opts in to limits-only execution.
    sandbox: SandboxConfig = _DEFAULT_SANDBOX
    max_tests: int = 32

    name = "code"
    default_file = "code_sample.jsonl"

    def __post_init__(self):
        if not isinstance(self.sandbox, SandboxConfig):  # from a config file: a dict / pairs
            overrides = dict(self.sandbox)
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SandboxConfig)})
            if unknown:
                raise ConfigError(f"sandbox.{unknown[0]} is not a field of SandboxConfig")
            object.__setattr__(self, "sandbox", dataclasses.replace(_DEFAULT_SANDBOX, **overrides))
        super().__post_init__()
        check_one_of("mode", self.mode, ("fraction", "all"))
        check_int("max_tests", self.max_tests, min_value=1)
        # Untrusted code needs isolation this machine can give, or an explicit
        # sandbox.isolation='rlimits': a config error now, not a warning at the first reward.
        try:
            resolve_isolation(self.sandbox)
        except ConfigError as e:
            raise ConfigError(f"sandbox.{e}") from None

    def row_problem(self, row):
        problem = (check_field(row, "prompt", (str,)) or check_field(row, "tests", (list,))
                   or check_field(row, "fn_name", (str,), required=False)
                   or check_field(row, "solution", (str,), required=False))
        if problem:
            return problem
        if not row["tests"]:
            return "'tests' is empty"
        # Function style calls fn(*input): input is the argument list. Stdio style feeds the
        # input as text and compares printed tokens with the output.
        function_style = bool(row.get("fn_name"))
        for i, test in enumerate(row["tests"]):
            if not isinstance(test, dict):
                return f"tests[{i}] must be an object with 'input' and 'output'"
            if function_style:  # any JSON value (null included) can be a return value
                problem = check_field(test, "input", (list,)) or (
                    None if "output" in test else "missing 'output'")
            else:
                problem = (check_field(test, "input", (str, int, float))
                           or check_field(test, "output", (str, int, float)))
            if problem:
                return f"tests[{i}]: {problem}"
        return None

    def _from_row(self, row):
        solution = row.get("solution")
        answer = f"```python\n{solution.rstrip()}\n```" if solution else ""
        metadata = {"tests": row["tests"][:self.max_tests], "fn_name": row.get("fn_name")}
        return str(row["prompt"]), answer, None, metadata

    def _score(self, record, answer_region):
        code = extract_code(answer_region)
        if code is None:
            return {"answer_parsed": False, "correct": False}
        tests = record.metadata["tests"]
        fn_name = record.metadata.get("fn_name")
        passed, limits = (self._run_function(code, fn_name, tests) if fn_name
                          else self._run_stdio(code, tests))
        fraction = passed / len(tests)
        reward = fraction if self.mode == "fraction" else float(passed == len(tests))
        return {"answer_parsed": True, "correct": passed == len(tests), "reward": reward,
                "tests_passed": passed, "tests_total": len(tests), "limits": limits}

    def _run_function(self, code: str, fn_name: str, tests: list[dict]) -> tuple[int, list]:
        program = _FUNCTION_HARNESS.format(source=code, fn_name=fn_name, marker=_RESULT_MARKER)
        result = run_python(program, self.sandbox,
                            stdin=json.dumps([t["input"] for t in tests]))
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith(_RESULT_MARKER)]
        if not lines or result.limit is not None:
            return 0, [result.limit]
        try:
            outcomes = json.loads(lines[-1][len(_RESULT_MARKER):])
        except ValueError:
            return 0, [result.limit]
        passed = sum(isinstance(o, list) and len(o) == 2 and o[0] == "ok"
                     and _same(o[1], t["output"]) for o, t in zip(outcomes, tests))
        return passed, [result.limit]

    def _run_stdio(self, code: str, tests: list[dict]) -> tuple[int, list]:
        passed, limits = 0, []
        for t in tests:
            result = run_python(code, self.sandbox, stdin=str(t["input"]))
            limits.append(result.limit)
            passed += result.ok and result.stdout.split() == str(t["output"]).split()
        return passed, limits
