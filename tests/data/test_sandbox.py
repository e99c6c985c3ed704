"""Sandbox attack suite: every attack contained and reported, the test machine unharmed.

All attacks run concurrently in one SandboxPool (module fixture) to keep the suite short. The
fork bombs, writes outside the work dir, parent-env reads, network and kill attacks only run
with namespaces: as root in "rlimits" mode they would really succeed (RLIMIT_NPROC does not bind
root, there is no uid change), so those tests skip where namespaces are missing.
"""
import concurrent.futures
import dataclasses
import os
import signal
import socket

import pytest

from ring_jax.config import ConfigError
from ring_jax.data.sandbox import SandboxConfig, SandboxPool, namespaces_available, run_python

NS = namespaces_available()
needs_ns = pytest.mark.skipif(not NS, reason="needs root + unshare (namespaces isolation)")
BASE_UID = 300_000  # separate from the library default, so leftovers are attributable
# A generous wall limit so CPU-bound attacks hit the CPU limit even on a loaded machine; the
# attacks that can only end by the wall clock (sleeping) use the short one.
CFG = SandboxConfig(wall_timeout_s=30.0, cpu_time_s=1, memory_mb=256, file_size_mb=4,
                    max_processes=8, max_output_bytes=16_384, tmpfs_mb=16,
                    isolation="namespaces" if NS else "rlimits", base_uid=BASE_UID)
SHORT_CFG = dataclasses.replace(CFG, wall_timeout_s=3.0)
WALL_BOUND = {"sleep_forever", "fork_bomb_persistent"}
SECRET = "ring-jax-secret-4f9a"


def sandbox_uids_alive():
    """Processes on this machine owned by any sandbox uid of this test's range."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            continue
        if BASE_UID <= uid < BASE_UID + (1 << 21):
            alive.append(pid)
    return alive


@pytest.fixture(scope="module")
def host_victims(tmp_path_factory):
    """Host resources attacks aim at: a world-writable file in /tmp and a listener."""
    victim = tmp_path_factory.mktemp("victim") / "keep.txt"
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
            "import os\nfor p in [{v!r}, '/work/pwned', os.path.expanduser('~root/pwned'), "
            "'/etc/pwned', '/tmp/pwned_by_sandbox']:\n"
            "    try:\n        open(p, 'w').write('pwned')\n        print('WROTE', p)\n"
            "    except OSError as e:\n        print('DENIED', p, e.errno)\n"
        ).format(v=host_victims["victim"])
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
    assert r.stdout.count("DENIED") == 2 and "KILLED" not in r.stdout, r.stdout


@needs_ns
def test_fork_bombs_contained_and_cleaned_up(results):
    assert results["fork_bomb"].limit == "processes"
    assert results["fork_bomb_persistent"].limit in ("wall_time", "cpu_time", "processes")
    assert sandbox_uids_alive() == []


@needs_ns
def test_runs_as_unprivileged_uid_in_private_namespaces():
    code = "import os\nprint(os.getuid(), os.getpid(), len([p for p in os.listdir('/proc') " \
           "if p.isdigit()]))"
    r = run_python(code, CFG)
    uid, pid, visible = map(int, r.stdout.split())
    assert uid >= BASE_UID and pid == 2 and visible == 2  # launcher (pid 1) + itself


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
