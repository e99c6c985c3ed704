"""Sandbox attack suite: every attack contained and reported, the test machine unharmed.

All attacks run concurrently in one SandboxPool (module fixture) to keep the suite short. The
fork bombs, daemons, writes outside the work dir (directly and through a symlink), parent-env
reads, network and kill attacks run with the strongest isolation this process gets: root
namespaces, or unprivileged user namespaces for a non-root user. Without either ("rlimits",
an explicit opt-in) they would really succeed, so those tests skip there.
`tests/data/test_sandbox_unprivileged.py` reruns this file as uid 65534 when the suite runs as
root, so both the root and the non-root isolation are attacked on every run.

RING_JAX_SANDBOX_VICTIM_DIR: a directory this user may write outside /tmp (the unprivileged
rerun passes one), for the writes that namespaces must turn read-only rather than hide.
"""
import concurrent.futures
import dataclasses
import os
import pathlib
import signal
import socket

import pytest

from ring_jax.config import ConfigError
from ring_jax.data import sandbox
from ring_jax.data.sandbox import SandboxConfig, SandboxPool, best_isolation, run_python

ISOLATION = best_isolation()  # "namespaces" (root), "user_namespaces" or None
NS = ISOLATION is not None
needs_ns = pytest.mark.skipif(not NS, reason="needs root namespaces or unprivileged user "
                                             "namespaces (unshare)")
BASE_UID = 300_000  # separate from the library default, so leftovers are attributable
# A generous wall limit so CPU-bound attacks hit the CPU limit even on a loaded machine; the
# attacks that can only end by the wall clock (sleeping) use the short one.
CFG = SandboxConfig(wall_timeout_s=30.0, cpu_time_s=1, memory_mb=256, file_size_mb=4,
                    max_processes=8, max_output_bytes=16_384, tmpfs_mb=16,
                    isolation=ISOLATION or "rlimits", base_uid=BASE_UID)
SHORT_CFG = dataclasses.replace(CFG, wall_timeout_s=3.0)
WALL_BOUND = {"sleep_forever", "fork_bomb_persistent"}
SECRET = "ring-jax-secret-4f9a"
ENV_ALLOWED = {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE"}


def sandbox_programs_alive():
    """Sandboxed programs still running on this machine: processes of this test's uid range
    (root namespaces), or of this user running a sandbox ``program.py`` (user namespaces)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ISOLATION == "namespaces" and BASE_UID <= uid < BASE_UID + (1 << 21):
            alive.append(pid)
        elif ISOLATION == "user_namespaces" and uid == os.geteuid() and b"program.py" in cmdline:
            alive.append(pid)
    return alive


@pytest.fixture(scope="module")
def host_victims(tmp_path_factory):
    """Host resources attacks aim at: a world-writable file in /tmp and a listener."""
    victim_dir = os.environ.get("RING_JAX_SANDBOX_VICTIM_DIR")
    victim = (pathlib.Path(victim_dir) if victim_dir
              else tmp_path_factory.mktemp("victim")) / "keep.txt"
    victim.write_text("original")
    os.chmod(victim, 0o666)
    os.chmod(victim.parent, 0o777)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    yield {"victim": str(victim), "port": listener.getsockname()[1], "listener": listener}
    listener.close()


ATTACKS = {
    "normal": "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))",
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(1000)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))",
    "huge_file": ("with open('big.bin', 'wb') as f:\n    while True:\n"
                  "        f.write(b'0' * (1 << 20))"),
    "print_gigabytes": ("import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n"
                        "    sys.stdout.write(chunk)"),
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "deep_recursion_unlimited": ("import sys\nsys.setrecursionlimit(10**8)\n"
                                 "def f(n):\n    return f(n + 1) + 1\nf(0)"),
    "environment": "import os\nprint(sorted(os.environ))\nprint(dict(os.environ))",
}


@pytest.fixture(scope="module")
def results(host_victims):
    parent = os.getpid()
    os.environ[SECRET] = SECRET  # an env var the program must not see
    try:
        codes = dict(ATTACKS)
        if not NS:  # the attacks below would really succeed as root without namespaces
            return _run_all(codes)
        codes["write_outside"] = (
            "import os\nos.symlink({v!r}, 'link')\n"
            "for p in [{v!r}, 'link', '/work/pwned', os.path.expanduser('~root/pwned'), "
            "'/etc/pwned', '/tmp/pwned_by_sandbox']:\n"
            "    try:\n        open(p, 'w').write('pwned')\n        print('WROTE', p)\n"
            "    except OSError as e:\n        print('DENIED', p, e.errno)\n"
        ).format(v=host_victims["victim"])
        # A daemon (fork, setsid, parent exits) must not outlive the run.
        codes["daemon"] = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                           "    time.sleep(300)\nprint('parent exits')\n")
        codes["read_parent_env"] = (
            "import os\nprint(dict(os.environ))\n"
            f"for pid in [{parent}, os.getppid()]:\n"
            "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
            "    except OSError as e:\n        print('DENIED', e.errno)\n")
        codes["network"] = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {host_victims['port']}), timeout=2)\n"
            "    print('CONNECTED')\nexcept OSError as e:\n    print('BLOCKED', e.errno)\n")
        codes["kill_parent"] = (
            "import os, signal\n"
            f"for pid in [{parent}, os.getppid()]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('KILLED', pid)\n"
            "    except OSError as e:\n        print('DENIED', pid, e.errno)\n")
        codes["fork_bomb"] = "import os\nwhile True:\n    os.fork()"
        codes["fork_bomb_persistent"] = (
            "import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        time.sleep(0.01)\n")
        return _run_all(codes)
    finally:
        del os.environ[SECRET]


def _run_all(codes):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = {name: pool.submit(run_python, code, SHORT_CFG if name in WALL_BOUND else CFG,
                                     "1 2 3\n") for name, code in codes.items()}
        return {name: f.result() for name, f in futures.items()}


def test_normal_program_passes(results):
    r = results["normal"]
    assert r.ok and r.stdout.strip() == "6" and r.limit is None


def test_infinite_loop_hits_cpu_limit(results):
    r = results["infinite_loop"]
    assert r.limit == "cpu_time" and not r.ok and r.exit_code == -signal.SIGXCPU


def test_sleep_hits_wall_timeout(results):
    r = results["sleep_forever"]
    assert r.limit == "wall_time" and r.wall_s < SHORT_CFG.wall_timeout_s + 5


def test_pool_runs_concurrently():
    with SandboxPool(SHORT_CFG, num_workers=3) as pool:
        results = pool.map([f"print({i} * {i})" for i in range(6)])
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]


def test_memory_bomb(results):
    assert results["memory_bomb"].limit == "memory"


def test_huge_file(results):
    assert results["huge_file"].limit == "file_size"


def test_printing_gigabytes_is_truncated(results):
    r = results["print_gigabytes"]
    assert r.limit == "output" and r.truncated
    assert len(r.stdout.encode()) <= CFG.max_output_bytes


def test_deep_recursion(results):
    r = results["deep_recursion"]
    assert r.exit_code == 1 and "RecursionError" in r.stderr  # a normal error, not a crash
    r = results["deep_recursion_unlimited"]
    assert not r.ok and r.limit in ("stack", "memory", "cpu_time")


@needs_ns
def test_writes_outside_workdir(results, host_victims):
    r = results["write_outside"]
    with open(host_victims["victim"]) as f:
        assert f.read() == "original"
    for path in ("/work/pwned", "/etc/pwned", "/root/pwned", "/tmp/pwned_by_sandbox"):
        assert not os.path.exists(path), path
    # /tmp is a private tmpfs: the write "succeeds" there and vanishes with the namespace.
    assert "WROTE /tmp/pwned_by_sandbox" in r.stdout
    assert "WROTE /work" not in r.stdout and "WROTE /etc" not in r.stdout
    assert "WROTE link" not in r.stdout and f"WROTE {host_victims['victim']}" not in r.stdout


def test_environment_is_an_allow_list_in_every_mode(results):
    """The trainer's environment (API keys, tokens) never reaches the program, even with
    rlimits only."""
    r = results["environment"]
    assert set(eval(r.stdout.splitlines()[0])) <= ENV_ALLOWED, r.stdout
    assert SECRET not in r.stdout


@needs_ns
def test_daemon_does_not_outlive_the_run(results):
    assert "parent exits" in results["daemon"].stdout
    assert sandbox_programs_alive() == []


@needs_ns
def test_parent_environment_is_hidden(results):
    r = results["read_parent_env"]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert "DENIED" in r.stdout


@needs_ns
def test_network_is_unreachable(results, host_victims):
    assert "BLOCKED" in results["network"].stdout
    with pytest.raises(socket.timeout):
        host_victims["listener"].accept()  # nothing ever connected


@needs_ns
def test_kill_parent_fails(results):
    r = results["kill_parent"]
    if ISOLATION == "namespaces":
        assert r.stdout.count("DENIED") == 2 and "KILLED" not in r.stdout, r.stdout
    else:
        # The trainer is outside the pid namespace; the program's parent is the launcher, pid 1
        # of the namespace and of the program's own uid: the kernel accepts kill(1, SIGKILL)
        # from inside and drops it (init is immune), so the launcher survives and reports.
        lines = r.stdout.splitlines()
        assert lines[0].startswith("DENIED") and lines[1] in ("KILLED 1", "DENIED 1 1"), lines
        assert r.exit_code == 0 and r.cpu_s is not None  # the launcher's status report


@needs_ns
def test_fork_bombs_contained_and_cleaned_up(results):
    assert results["fork_bomb"].limit == "processes"
    assert results["fork_bomb_persistent"].limit in ("wall_time", "cpu_time", "processes")
    assert sandbox_programs_alive() == []


@needs_ns
def test_runs_as_unprivileged_uid_in_private_namespaces():
    code = "import os\nprint(os.getuid(), os.getpid(), len([p for p in os.listdir('/proc') " \
           "if p.isdigit()]))"
    r = run_python(code, CFG)
    uid, pid, visible = map(int, r.stdout.split())
    if ISOLATION == "namespaces":
        assert uid >= BASE_UID
    else:  # the invoking user, seen as uid 1000 of the program's nested user namespace
        assert uid == 1000
    assert pid == 2 and visible == 2  # launcher (pid 1) + itself


def test_result_streams_and_exit_codes():
    r = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", CFG)
    assert (r.exit_code, r.stdout, r.stderr, r.limit) == (3, "out\n", "err\n", None)
    assert not r.ok


def test_interpreter_resolution(tmp_path):
    from ring_jax.data.sandbox import _world_executable
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "python").write_text("")
    os.chmod(hidden / "python", 0o755)
    assert not _world_executable(str(hidden / "python"))  # a pyenv under /root looks like this
    assert _world_executable("/bin/sh")


def test_config_validation():
    with pytest.raises(ConfigError, match="isolation"):
        SandboxConfig(isolation="docker")
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxConfig(memory_mb=1)


def test_auto_without_isolation_is_an_error_not_a_fallback(monkeypatch):
    """Where neither namespaces nor user namespaces work, untrusted code needs an explicit
    isolation='rlimits' (before, 'auto' fell back to it with a log warning)."""
    from ring_jax.data import tasks
    monkeypatch.setattr(sandbox, "best_isolation", lambda: None)
    with pytest.raises(ConfigError, match="isolation='auto' is invalid: found no isolation "
                                          "here.*set isolation='rlimits'"):
        sandbox.resolve_isolation(SandboxConfig())
    with pytest.raises(ConfigError, match="sandbox.isolation='auto' is invalid"):
        tasks.get("code")
    opted_in = tasks.get("code", sandbox={"isolation": "rlimits"})
    assert opted_in.sandbox.isolation == "rlimits" and opted_in.sandbox.cpu_time_s == 2
    with pytest.raises(ConfigError, match="sandbox.isolatoin is not a field"):
        tasks.get("code", sandbox={"isolatoin": "rlimits"})
