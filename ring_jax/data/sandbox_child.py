"""Sandbox launcher, run as ``python -I -S sandbox_child.py key=value ...`` (stdlib only; no
json/ctypes unless needed, since their imports dominate its start-up time).

It forks the untrusted program, waits for it, and writes "exit_code cpu_seconds maxrss_kb" to
the status pipe ``status_fd`` (which the program never sees, so its report cannot be forged
from inside).

"namespaces" mode: this launcher runs as root and is pid 1 of fresh network, mount and pid
namespaces (``unshare --net --mount --pid --fork --kill-child --mount-proc``). Before forking it
mounts small private tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock (anything the program
writes to a world-writable place lands in memory and vanishes with the namespace) and makes
/tmp/work. The child drops to an unprivileged uid/gid with no supplementary groups (RLIMIT_NPROC
is enforced for it — it is not for root — and root-owned files and processes are out of reach),
sets the limits and ``exec``s the interpreter with a scrubbed environment. When the launcher
exits or is killed (``--kill-child`` and its pdeathsig), the kernel kills every process left in
the pid namespace, so forked or daemonized leftovers cannot outlive the run.

"rlimits" mode (no namespaces, e.g. not root): the same fork/limits/exec in the host work dir;
no network isolation, no uid change (RLIMIT_NPROC is then only meaningful for non-root users).
"""
import os
import resource
import signal
import sys

MS_NOSUID, MS_NODEV = 2, 4
PR_SET_PDEATHSIG = 1


INT_KEYS = ("status_fd", "uid", "cpu_time_s", "memory_mb", "file_size_mb", "max_processes",
            "tmpfs_mb", "stack_mb")


def parse_spec(argv: list[str]) -> dict:
    spec = dict(arg.split("=", 1) for arg in argv)
    for key in INT_KEYS:
        spec[key] = int(spec[key])
    return spec


def mount_tmpfs(libc, target: str, size_mb: int) -> None:
    if not os.path.isdir(target):
        return
    options = f"size={size_mb}m,mode=1777".encode()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        raise OSError(f"mount tmpfs on {target} failed")


def prepare_namespace(spec: dict, program: bytes, stdin: bytes) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for target in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        mount_tmpfs(libc, target, spec["tmpfs_mb"])
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    for name, data in (("program.py", program), ("stdin.txt", stdin)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
        os.chown(os.path.join(work, name), spec["uid"], spec["uid"])
    os.chown(work, spec["uid"], spec["uid"])
    os.chdir(work)


def exec_program(spec: dict, status_fd: int) -> None:
    """In the forked child: drop privileges, set limits, exec. Never returns."""
    try:
        os.close(status_fd)
        if spec["isolation"] == "namespaces":
            uid = spec["uid"]
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            import ctypes
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        limits = {
            resource.RLIMIT_CPU: (spec["cpu_time_s"], spec["cpu_time_s"] + 1),
            resource.RLIMIT_AS: (spec["memory_mb"] << 20,) * 2,
            resource.RLIMIT_FSIZE: (spec["file_size_mb"] << 20,) * 2,
            resource.RLIMIT_NPROC: (spec["max_processes"],) * 2,
            resource.RLIMIT_NOFILE: (64, 64),
            resource.RLIMIT_CORE: (0, 0),
            resource.RLIMIT_STACK: (spec["stack_mb"] << 20,) * 2,
        }
        for which, value in limits.items():
            resource.setrlimit(which, value)
        stdin_fd = os.open("stdin.txt", os.O_RDONLY)
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        env = {"PATH": "/usr/bin:/bin", "HOME": os.getcwd(), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        os.execve(spec["python"], [spec["python"], "-I", "program.py"], env)
    except BaseException as e:  # noqa: BLE001 — report and leave without running cleanup
        os.write(2, f"sandbox launcher: {e!r}\n".encode())
    os._exit(126)


def main() -> None:
    spec = parse_spec(sys.argv[1:])
    status_fd = spec["status_fd"]
    with open(os.path.join(spec["host_dir"], "program.py"), "rb") as f:
        program = f.read()
    with open(os.path.join(spec["host_dir"], "stdin.txt"), "rb") as f:
        stdin = f.read()
    if spec["isolation"] == "namespaces":
        prepare_namespace(spec, program, stdin)
    else:
        os.chdir(spec["host_dir"])
    child = os.fork()
    if child == 0:
        exec_program(spec, status_fd)
    while True:  # as pid 1 we also reap re-parented orphans until the program itself exits
        pid, status, rusage = os.wait4(-1, 0)
        if pid == child:
            break
    cpu_s = rusage.ru_utime + rusage.ru_stime
    report = f"{os.waitstatus_to_exitcode(status)} {cpu_s:.6f} {rusage.ru_maxrss}"
    os.write(status_fd, report.encode())
    os.close(status_fd)


if __name__ == "__main__":
    main()
