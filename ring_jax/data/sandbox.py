"""Sandboxed execution of untrusted Python (the ASandbox role of Ring-1T's ASystem, PAPER §4).

``run_python(code, cfg, stdin="") -> SandboxResult``: the program runs with a wall-clock timeout
and CPU-time, address-space, file-size, open-file and process-count limits, in a fresh working
directory, with a scrubbed environment; the whole process group (and, with namespaces, the
whole pid namespace) is killed on timeout or when output passes ``max_output_bytes``.
``SandboxPool`` runs many programs in parallel on host threads (each run is its own process
tree, so the GIL is not a bottleneck).

Isolation modes (``cfg.isolation``), see ``sandbox_child.py`` for what the launcher does:

* ``"namespaces"`` — needs root (or CAP_SYS_ADMIN) and util-linux ``unshare``: new network
  namespace (only a down loopback: no network at all), new mount namespace with private tmpfs
  over every world-writable directory, new pid namespace (the parent and all other processes are
  invisible; leftovers die with it), unprivileged per-run uid (RLIMIT_NPROC enforced, root files
  read-only or unreadable). Checked on this machine (Linux 6.18, root, Nov 2026).
* ``"user_namespaces"`` — for non-root users (the usual case on clusters), where the kernel
  allows unprivileged user namespaces (``unshare --user --map-root-user``): the same network,
  mount and pid namespaces; the program runs as the invoking user (no other uid can be mapped)
  with every mount read-only except its private tmpfs, and without capabilities. It can read
  what the invoking user can read (no root-only files), and RLIMIT_NPROC counts the user's own
  processes in this user namespace. Checked as uid 65534 on this machine (Dec 2026).
* ``"rlimits"`` — resource limits and a process group only: NOT network-, filesystem- or
  process-isolated (a daemon can outlive the run; files the user can write are writable).
  Never chosen automatically: a config must ask for it explicitly.
* ``"auto"`` — ``namespaces`` as root, else ``user_namespaces``, each if a probe run succeeds;
  if neither works it is a ConfigError naming the fix (``isolation="rlimits"`` to accept
  limits-only), not a silent fallback.

The program's environment is always an allow-list (PATH, HOME, LANG,
PYTHONDONTWRITEBYTECODE): API keys or tokens in the trainer's environment never reach it.

Which limit was hit is read from the launcher's status pipe (exit signal, CPU time) and, for
conditions Python turns into exceptions (MemoryError, EFBIG, EAGAIN on fork), from the tail of
stderr — a program can fake those labels for itself, but never escape the limits.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable, Sequence

from ring_jax.config import ConfigError, check, check_float, check_int, check_one_of

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_UNSHARE = ("unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
_UNSHARE_USER = ("unshare", "--user", "--map-root-user", *_UNSHARE[1:])
ISOLATIONS = ("auto", "namespaces", "user_namespaces", "rlimits")
LIMITS = ("wall_time", "cpu_time", "memory", "file_size", "processes", "output", "stack")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    wall_timeout_s: float = 5.0
    cpu_time_s: int = 4
    memory_mb: int = 256
    file_size_mb: int = 16
    max_processes: int = 16
    max_output_bytes: int = 64 * 1024
    tmpfs_mb: int = 64
    stack_mb: int = 8
    isolation: str = "auto"
    python: str = "auto"  # interpreter for the program; "auto": see `resolve_python`
    base_uid: int = 200_000

    def __post_init__(self):
        check_float("wall_timeout_s", self.wall_timeout_s, min_value=0.0, min_exclusive=True)
        check_int("cpu_time_s", self.cpu_time_s, min_value=1)
        check_int("memory_mb", self.memory_mb, min_value=32)
        check_int("file_size_mb", self.file_size_mb, min_value=1)
        check_int("max_processes", self.max_processes, min_value=1)
        check_int("max_output_bytes", self.max_output_bytes, min_value=1)
        check_int("tmpfs_mb", self.tmpfs_mb, min_value=1)
        check_int("stack_mb", self.stack_mb, min_value=1)
        check_one_of("isolation", self.isolation, ISOLATIONS)
        check_int("base_uid", self.base_uid, min_value=1000, max_value=(1 << 31) - (1 << 21))
        check(self.python == "auto" or os.path.isabs(self.python), "python", self.python,
              "must be 'auto' or an absolute path")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # the program's exit status; -N if killed by signal N; None: unknown
    stdout: str
    stderr: str
    limit: str | None  # which of LIMITS was hit, None if none
    truncated: bool  # output was cut at max_output_bytes
    wall_s: float
    cpu_s: float | None
    isolation: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None


def _probe(argv: Sequence[str]) -> bool:
    try:
        probe = subprocess.run([*argv, "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=None)
def namespaces_available() -> bool:
    """Whether ``unshare`` may create net+mount+pid namespaces here (root, no seccomp block)."""
    return shutil.which("unshare") is not None and os.geteuid() == 0 and _probe(_UNSHARE)


@functools.lru_cache(maxsize=None)
def user_namespaces_available() -> bool:
    """Whether this (any) user may create a user namespace with net+mount+pid namespaces
    (``kernel.unprivileged_userns_clone``, ``user.max_user_namespaces``, AppArmor/seccomp)."""
    return shutil.which("unshare") is not None and _probe(_UNSHARE_USER)


def best_isolation() -> str | None:
    """The strongest isolation this process can get: "namespaces" (root), "user_namespaces",
    or None."""
    if namespaces_available():
        return "namespaces"
    return "user_namespaces" if user_namespaces_available() else None


def resolve_isolation(cfg: SandboxConfig) -> str:
    """The mode a run uses; ConfigError (field ``isolation``) when the asked-for isolation is
    not possible here. "rlimits" is only ever the config's explicit choice."""
    if cfg.isolation == "namespaces":
        check(namespaces_available(), "isolation", cfg.isolation,
              "needs root and a working `unshare` (use 'auto' or 'user_namespaces')")
    elif cfg.isolation == "user_namespaces":
        check(user_namespaces_available(), "isolation", cfg.isolation,
              "needs `unshare` and unprivileged user namespaces (kernel.unprivileged_userns_"
              "clone=1, user.max_user_namespaces > 0, no AppArmor/seccomp block)")
    elif cfg.isolation == "auto":
        best = best_isolation()
        check(best is not None, "isolation", cfg.isolation,
              "found no isolation here (namespaces need root; unprivileged user namespaces are "
              "not permitted or `unshare` is missing): set isolation='rlimits' to run untrusted "
              "code with resource limits only (no network, filesystem or process isolation)")
        return best
    return cfg.isolation


def _world_executable(path: str) -> bool:
    """Whether any uid can run ``path``: it and every directory above it are o+x."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


@functools.lru_cache(maxsize=None)
def resolve_python(choice: str, isolation: str) -> str:
    """The program's interpreter. With namespaces it runs as an unprivileged uid, which may not
    reach this process's interpreter (e.g. a pyenv under /root); ``/usr/bin/python3`` is then
    the first choice. Otherwise it runs as this user: this interpreter if this user may run
    it (a process can be started from one it could not exec itself, e.g. by setpriv), else
    ``/usr/bin/python3``."""
    if choice != "auto":
        return choice
    if isolation == "namespaces":
        for candidate in ("/usr/bin/python3", sys.executable):
            if _world_executable(candidate):
                return candidate
        raise ConfigError("python='auto' found no interpreter an unprivileged uid may run "
                          "(/usr/bin/python3 missing, this one is not o+x): set "
                          "SandboxConfig.python")
    for candidate in (sys.executable, "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(f"python='auto' found no interpreter this user may run ({sys.executable}, "
                      "/usr/bin/python3): set SandboxConfig.python")


class _UidAllocator:
    """Distinct uid per concurrent run: RLIMIT_NPROC counts processes per uid, so two runs that
    shared a uid would share one process budget. A per-process offset keeps separate Python
    processes (e.g. several reward workers) apart."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next = 0
        self._offset = (os.getpid() * 256) % (1 << 20)

    def acquire(self, base_uid: int) -> int:
        with self._lock:
            slot = self._free.pop() if self._free else self._next
            self._next = max(self._next, slot + 1)
        return base_uid + (self._offset + slot) % (1 << 21)

    def release(self, uid: int, base_uid: int) -> None:
        with self._lock:
            self._free.append((uid - base_uid - self._offset) % (1 << 21))


_UIDS = _UidAllocator()


def _classify(cfg: SandboxConfig, exit_code: int | None, cpu_s: float | None,
              stderr_tail: str) -> str | None:
    if exit_code == -signal.SIGXCPU or (exit_code == -signal.SIGKILL and cpu_s is not None
                                        and cpu_s >= cfg.cpu_time_s - 0.05):
        return "cpu_time"
    if exit_code == -signal.SIGXFSZ or "File too large" in stderr_tail \
            or "No space left on device" in stderr_tail:
        return "file_size"
    if exit_code == -signal.SIGSEGV:
        return "stack"  # the usual cause in CPython: C stack exhausted by deep recursion
    if "MemoryError" in stderr_tail or "Cannot allocate memory" in stderr_tail:
        return "memory"
    if "Resource temporarily unavailable" in stderr_tail:
        return "processes"  # EAGAIN from fork/clone at RLIMIT_NPROC
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, cfg: SandboxConfig = SandboxConfig(), stdin: str = "") -> SandboxResult:
    """Runs ``code`` as a Python program in the sandbox. Never raises for anything the program
    does; raises only if the sandbox itself cannot start (e.g. isolation='namespaces' where it
    is not permitted)."""
    isolation = resolve_isolation(cfg)
    python = resolve_python(cfg.python, isolation)
    host_dir = tempfile.mkdtemp(prefix="ring_sandbox_")
    uid = _UIDS.acquire(cfg.base_uid)
    status_r, status_w = os.pipe()
    start = time.monotonic()
    proc = None
    try:
        for name, text in (("program.py", code), ("stdin.txt", stdin)):
            with open(os.path.join(host_dir, name), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write(text)
        spec = {"host_dir": host_dir, "isolation": isolation, "uid": uid, "python": python,
                "status_fd": status_w, "cpu_time_s": cfg.cpu_time_s,
                "memory_mb": cfg.memory_mb, "file_size_mb": cfg.file_size_mb,
                "max_processes": cfg.max_processes, "tmpfs_mb": cfg.tmpfs_mb,
                "stack_mb": cfg.stack_mb}
        # The launcher is stdlib-only: any interpreter this user may run will do.
        launcher = [resolve_python("auto", "rlimits"), "-I", "-S", _CHILD,
                    *(f"{k}={v}" for k, v in spec.items())]
        prefix = {"namespaces": _UNSHARE, "user_namespaces": _UNSHARE_USER}.get(isolation, ())
        argv = [*prefix, "--", *launcher] if prefix else launcher
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=host_dir, pass_fds=(status_w,),
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                start_new_session=True)
        os.close(status_w)
        status_w = -1
        out, err, limit, truncated = _collect(proc, cfg, start)
        if limit is not None:
            _kill_group(proc)
        try:
            proc.wait(timeout=max(0.0, start + cfg.wall_timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            limit = "wall_time"
        _kill_group(proc)  # leftovers in the group (rlimits mode) or a launcher past its time
        proc.wait()
        report = _read_status(status_r)
        exit_code = report.get("exit") if report else None
        cpu_s = report.get("cpu_s") if report else None
        stderr = err.decode("utf-8", errors="replace")
        if limit is None:
            limit = _classify(cfg, exit_code, cpu_s, stderr[-2000:])
        return SandboxResult(exit_code=exit_code, stdout=out.decode("utf-8", errors="replace"),
                             stderr=stderr, limit=limit, truncated=truncated,
                             wall_s=time.monotonic() - start, cpu_s=cpu_s, isolation=isolation)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        _UIDS.release(uid, cfg.base_uid)
        shutil.rmtree(host_dir, ignore_errors=True)


def _collect(proc: subprocess.Popen, cfg: SandboxConfig, start: float
             ) -> tuple[bytes, bytes, str | None, bool]:
    """Reads stdout/stderr until both close, the wall deadline, or the output cap."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total, deadline = 0, start + cfg.wall_timeout_s
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), \
                    "wall_time", False
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = cfg.max_output_bytes - total
                bufs[key.fd] += chunk[:max(room, 0)]
                total += len(chunk)
                if total > cfg.max_output_bytes:
                    return bytes(bufs[proc.stdout.fileno()]), \
                        bytes(bufs[proc.stderr.fileno()]), "output", True
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), None, False


def _read_status(fd: int) -> dict | None:
    """The launcher's "exit_code cpu_seconds maxrss_kb" line, or None if it never wrote it."""
    os.set_blocking(fd, False)
    try:
        fields = os.read(fd, 4096).split()
        return {"exit": int(fields[0]), "cpu_s": float(fields[1]), "maxrss_kb": int(fields[2])}
    except (BlockingIOError, IndexError, ValueError):
        return None


class SandboxPool:
    """Runs sandboxed programs concurrently on ``num_workers`` host threads."""

    def __init__(self, cfg: SandboxConfig = SandboxConfig(), num_workers: int | None = None):
        self.cfg = cfg
        self.num_workers = num_workers or max(2, os.cpu_count() or 2)
        resolve_isolation(cfg)  # fail now, not inside a worker
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.num_workers, thread_name_prefix="sandbox")

    def submit(self, code: str, stdin: str = "") -> concurrent.futures.Future:
        return self._executor.submit(run_python, code, self.cfg, stdin)

    def map(self, codes: Iterable[str], stdins: Sequence[str] | None = None
            ) -> list[SandboxResult]:
        codes = list(codes)
        stdins = list(stdins) if stdins is not None else [""] * len(codes)
        return [f.result() for f in [self.submit(c, s) for c, s in zip(codes, stdins)]]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
