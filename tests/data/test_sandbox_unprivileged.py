"""The sandbox attack suite (tests/data/test_sandbox.py) rerun as an unprivileged uid.

Clusters run trainers as ordinary users: there the sandbox must isolate with unprivileged user
namespaces, not fall back to rlimits (where a setsid daemon survives, the program writes the
user's files, reaches a loopback listener and reads its parent's /proc/<pid>/environ). When
this suite runs as root, this test drops to uid 65534 in a subprocess and runs the whole
attack file there, requiring that no attack test was skipped.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534
UNSHARE_USER = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
                "--kill-child", "--mount-proc", "--", "true"]


# Popen drops privileges itself (no preexec_fn: Python code in a forked child of a
# multithreaded process can deadlock).
AS_NOBODY = {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _nobody_python(env: dict) -> list[str] | None:
    """An interpreter uid 65534 can run with pytest and ring_jax importable: this one, or the
    system python3 of the same version with this environment's site-packages (this one may
    live where uid 65534 cannot reach, e.g. a pyenv under /root)."""
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    for python, extra in ((sys.executable, []), ("/usr/bin/python3", site)):
        probe_env = dict(env, PYTHONPATH=os.pathsep.join([ROOT, *extra]))
        try:
            probe = subprocess.run(
                [python, "-c", "import sys, pytest, ring_jax.data.sandbox; "
                               f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"],
                env=probe_env, **AS_NOBODY, capture_output=True, timeout=120)
        except OSError:
            continue
        if probe.returncode == 0:
            env["PYTHONPATH"] = probe_env["PYTHONPATH"]
            return [python]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: tests/data/test_sandbox.py already "
                                              "runs as this unprivileged uid")
def test_attack_suite_as_uid_65534():
    if shutil.which("unshare") is None or subprocess.run(
            UNSHARE_USER, **AS_NOBODY, capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are not permitted here for uid 65534")
    home = tempfile.mkdtemp(prefix="ring_jax_nobody_")
    victim = tempfile.mkdtemp(prefix=".sandbox_victim_", dir=ROOT)  # writable, outside /tmp
    try:
        for path in (home, victim):
            os.chown(path, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "PYTHONDONTWRITEBYTECODE": "1", "RING_JAX_SANDBOX_VICTIM_DIR": victim}
        python = _nobody_python(env)
        if python is None:
            pytest.skip("no python with pytest + ring_jax that uid 65534 may run")
        out = subprocess.run(
            [*python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
             f"--basetemp={home}/pytest", "tests/data/test_sandbox.py"],
            cwd=ROOT, env=env, **AS_NOBODY, capture_output=True, text=True,
            timeout=300)
        report = out.stdout[-4000:] + out.stderr[-2000:]
        assert out.returncode == 0, report
        assert "skipped" not in out.stdout.splitlines()[-1], report
        with open(os.path.join(victim, "keep.txt")) as f:
            assert f.read() == "original"
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(victim, ignore_errors=True)
