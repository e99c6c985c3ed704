"""Every `ring_jax.main` / launcher command line in the docs and launch scripts validates.

Commands are extracted from README.md, BUILD.md, experiments/*.md, experiments/*.py (config
docstrings) and the usage comments of launch/*, reduced to the arguments that reach
`ring_jax.main` (a launcher's own options, `CONFIG=`/`WORKDIR=` of the SLURM script), and run
through `ring_jax.main`'s own parser with --validate_only semantics: config file + arg, every
``--config.<field>`` override, the validated ExperimentConfig. A doc that names a field that
does not exist (``--config.rl.icepop.alpha``) or a config arg the file rejects fails here.
Placeholders (``--config=...``, ``FILE:<arg>``) are skipped; self-checks of another module
(``RING_JAX_MODULE=ring_jax.train.distributed``) are not ring_jax.main command lines.
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

from ring_jax import main as main_lib
from ring_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What starts a command line, and how its ring_jax.main arguments begin.
_STARTS = re.compile(
    r"(?P<python>\S*python3?\s+-m\s+ring_jax\.main)"
    r"|(?P<local>launch/local\.sh)"
    r"|(?P<mp>launch/multiprocess_localhost\.sh[^`\n]*?\s--(?=\s))"
    r"|(?P<tpu>launch/tpu_vm\.sh\s+run\s+\S+\s+\S+\s+--(?=\s))"
    r"|(?P<slurm>sbatch(?:\s+-\S+)*\s+launch/slurm_gpu\.sbatch)")
_END = re.compile(r"`|&&|\|\||\s\|\s|;|\s#")  # where a command ends on its (joined) line
_PLACEHOLDER = re.compile(r"\.\.\.|<|>|\bFILE\b")


def _doc_lines(path: str) -> list[tuple[int, str]]:
    """(line number, line) to scan, backslash continuations joined onto the first line: a
    shell script's comment lines only (its code assembles commands from variables), anything
    else whole."""
    with open(path, encoding="utf-8") as f:
        return join_lines(f.read(), comments_only=path.endswith((".sh", ".sbatch")))


def join_lines(text: str, comments_only: bool = False) -> list[tuple[int, str]]:
    """`text` as (number, line) with continued lines appended to the line they continue."""
    out: list[tuple[int, str]] = []
    continued = False
    for number, line in enumerate(text.splitlines(), 1):
        if comments_only:
            if not line.startswith("#"):
                continued = False
                continue
            line = re.sub(r"^#\s?", "", line)
        if continued:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        else:
            out.append((number, line))
        continued = out[-1][1].endswith("\\")
        if continued:
            out[-1] = (out[-1][0], out[-1][1][:-1])
    return out


def extract_commands(lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """(line number, ring_jax.main arguments) of every command line in `lines`."""
    out = []
    for number, line in lines:
        for m in _STARTS.finditer(line):
            before = line[:m.start()]
            before = before[before.rfind("`") + 1:]  # this command's own prefix (env vars)
            if "RING_JAX_MODULE=" in before:
                continue  # runs another module (the distributed self-check)
            rest = line[m.end():]
            if (end := _END.search(rest)):
                rest = rest[:end.start()]
            rest = rest.replace("[", " ").replace("]", " ")  # optional arguments in usage
            args = [a for a in shlex.split(rest) if a != "..."]
            if m.lastgroup == "slurm":
                env = dict(re.findall(r"(CONFIG|WORKDIR)=(\S+)", before))
                args = [f"--config={env.get('CONFIG', '')}",
                        f"--workdir={env.get('WORKDIR', '')}"] + args
            config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), "")
            if not config or _PLACEHOLDER.search(config):
                continue
            out.append((number, args))
    return out


def _sources() -> list[str]:
    paths = ["README.md", "BUILD.md"] + sorted(
        glob.glob(os.path.join(ROOT, "experiments", "*.md"))
        + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
        + glob.glob(os.path.join(ROOT, "launch", "*")))
    return [os.path.relpath(os.path.join(ROOT, p), ROOT) for p in paths]


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(f"{source}:{number}", args) for source in _sources()
            for number, args in extract_commands(_doc_lines(os.path.join(ROOT, source)))]


COMMANDS = _all_commands()


def test_extractor_hand_case():
    lines = _doc_lines(os.path.join(ROOT, "launch", "slurm_gpu.sbatch"))
    assert extract_commands(lines) == [(6, ["--config=experiments/quickstart.py",
                                           "--workdir=/shared/runs/qs",
                                           "--config.rl.loss.alpha=0.5"])]
    sample = "\n".join([
        "run `python -m ring_jax.main --config=a.py:x --workdir=w && python plot.py w`",
        "`launch/multiprocess_localhost.sh -n 2 -d 1 -- --config=b.py --workdir=m`",
        "`launch/tpu_vm.sh run tpu zone -- --config=c.py --workdir=gs://b/r [--config.s=1 ...]`",
        "`RING_JAX_MODULE=ring_jax.train.distributed launch/local.sh --config=d.py`",
        "`python -m ring_jax.main --config=... --workdir=x` and FILE:<arg>: "
        "`python -m ring_jax.main --config=FILE:<arg> --workdir=y`",
        "    .venv/bin/python -m ring_jax.main --config=e.py \\",
        "        --workdir=z   # comment"])
    assert extract_commands(join_lines(sample)) == [
        (1, ["--config=a.py:x", "--workdir=w"]),
        (2, ["--config=b.py", "--workdir=m"]),
        (3, ["--config=c.py", "--workdir=gs://b/r", "--config.s=1"]),
        (6, ["--config=e.py", "--workdir=z"])]


def test_every_doc_with_commands_is_covered():
    """A change in wording must not make the extractor silently find nothing."""
    found = {name.split(":")[0] for name, _ in COMMANDS}
    expected = {"README.md", "BUILD.md", "experiments/REPRODUCING.md", "experiments/icepop.py",
                "experiments/quickstart.py", "launch/local.sh", "launch/slurm_gpu.sbatch",
                "launch/tpu_vm.sh", "launch/multiprocess_localhost.sh"}
    assert expected <= found, sorted(expected - found)


@pytest.fixture
def doc_cwd(tmp_path, monkeypatch):
    """A working directory where the docs' relative paths resolve: experiments/ is the
    repository's, and the SFT workdirs a command starts from (``--config.init_from=``, made
    by an earlier command of the same doc) exist as finished-checkpoint stand-ins."""
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    _write_fork_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_fork_module(root) -> None:
    """BUILD.md's "Fork a correction" example as the file it tells the reader to write
    (`my_fork/masks.py`), so the commands that select it validate against the doc's own code."""
    with open(os.path.join(ROOT, "BUILD.md"), encoding="utf-8") as f:
        section = f.read().split("### Fork a correction", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    os.makedirs(root / "my_fork", exist_ok=True)
    (root / "my_fork" / "__init__.py").write_text("")
    (root / "my_fork" / "masks.py").write_text(code)


@pytest.mark.parametrize("name,args", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_documented_command_validates(doc_cwd, name, args):
    for arg in args:
        if arg.startswith("--config.init_from="):
            os.makedirs(os.path.join(arg.split("=", 1)[1], "checkpoints", "1"), exist_ok=True)
    argv = ["ring_jax.main", *args, "--validate_only"]
    flag_values = flags.FlagValues()
    main_lib.define_flags(flag_values, sys_argv=argv)
    try:
        main_lib.parse_command_line(argv, flag_values)
    except (ConfigError, flags.Error) as e:
        pytest.fail(f"{name}: `{shlex.join(args)}` does not validate: {e}")
    assert flag_values.validate_only and flag_values.workdir


def test_local_launcher_validate_only(tmp_path):
    """The launcher end to end (a subprocess): an unknown field is one line naming it and the
    nearest valid fields, exit status 1, nothing written."""
    env = dict(os.environ, PYTHON=sys.executable)
    base = [os.path.join(ROOT, "launch", "local.sh"), "--config=experiments/quickstart.py",
            f"--workdir={tmp_path / 'w'}", "--validate_only"]
    bad = subprocess.run(base + ["--config.rl.icepop.alpha=0.5"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "invalid config: --config.rl.icepop.alpha: unknown config field 'rl.icepop.alpha'; "
        "nearest valid fields: rl.loss.alpha, rl.optim.eps, rl.loss.kpop_phi"]
    assert not (tmp_path / "w").exists()
