"""Sandbox launcher, run as ``python -I -S sandbox_child.py key=value ...`` (stdlib only; no
json/ctypes unless needed, since their imports dominate its start-up time).

It forks the untrusted program, waits for it, and writes "exit_code cpu_seconds maxrss_kb" to
the status pipe ``status_fd`` (which the program never sees, so its report cannot be forged
from inside). The program always gets a scrubbed environment (an allow-list: PATH, HOME,
LANG, PYTHONDONTWRITEBYTECODE), whatever the trainer's environment holds.

"namespaces" mode: this launcher runs as root and is pid 1 of fresh network, mount and pid
namespaces (``unshare --net --mount --pid --fork --kill-child --mount-proc``). Before forking it
mounts small private tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock (anything the program
writes to a world-writable place lands in memory and vanishes with the namespace) and makes
/tmp/work. The child drops to an unprivileged uid/gid with no supplementary groups (RLIMIT_NPROC
is enforced for it — it is not for root — and root-owned files and processes are out of reach),
sets the limits and ``exec``s the interpreter with a scrubbed environment. When the launcher
exits or is killed (``--kill-child`` and its pdeathsig), the kernel kills every process left in
the pid namespace, so forked or daemonized leftovers cannot outlive the run.

"user_namespaces" mode (a non-root user, where unprivileged user namespaces are allowed):
the same namespaces inside a new user namespace (``unshare --user --map-root-user ...``), so
the launcher is "root" only over its own namespaces. The program can no longer be given another
uid (only the invoking user's uid is mapped), so the launcher first remounts every mount
read-only (the program's uid owns the user's files: without this it could write them, also
through a symlink from its work dir), then mounts the private tmpfs as above, and the child
enters a nested user namespace as uid 1000 before ``exec``: it holds no capability over the
launcher's mount namespace, so it cannot unmount the tmpfs or remount anything writable.
The network, the trainer's processes (and their /proc/<pid>/environ) and leftovers are
handled by the net and pid namespaces as in root mode.

"rlimits" mode (explicit opt-in only, see ``sandbox.py``): the same fork/limits/exec in the
host work dir; no network, filesystem or process isolation, no uid change.
"""
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
# Per-mount flags a read-only remount must repeat: the kernel refuses (EPERM) to clear flags
# locked by a more privileged mount namespace, and a bind remount replaces all of them.
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
# Kernel interfaces whose writes are permission-checked per file, not by the mount.
PSEUDO_FILESYSTEMS = ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue")
PR_SET_PDEATHSIG = 1
CLONE_NEWUSER = 0x10000000
PROGRAM_UID = 1000  # the program's uid inside its nested user namespace (user_namespaces mode)
TMPFS_TARGETS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


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


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def remount_all_readonly(libc) -> None:
    """Every writable mount of this (private) mount namespace becomes read-only; fails closed
    if a real filesystem refuses."""
    import ctypes
    refused = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target, options = _unescape(fields[4]), fields[5].split(",")
        fstype = fields[fields.index("-") + 1]
        if "ro" in options or fstype in PSEUDO_FILESYSTEMS:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        if libc.mount(None, target.encode(), None, flags, None) != 0:
            refused.append(f"{target} ({fstype}): {os.strerror(ctypes.get_errno())}")
    if refused:
        raise OSError("cannot make these mounts read-only: " + "; ".join(refused))


def prepare_namespace(spec: dict, program: bytes, stdin: bytes) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    user_mode = spec["isolation"] == "user_namespaces"
    if user_mode:
        remount_all_readonly(libc)
    for target in TMPFS_TARGETS:
        mount_tmpfs(libc, target, spec["tmpfs_mb"])
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    for name, data in (("program.py", program), ("stdin.txt", stdin)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
        if not user_mode:  # user mode: the program's uid already owns what the launcher made
            os.chown(os.path.join(work, name), spec["uid"], spec["uid"])
    if not user_mode:
        os.chown(work, spec["uid"], spec["uid"])
    os.chdir(work)


def enter_nested_user_namespace() -> None:
    """A user namespace below the launcher's, as PROGRAM_UID: after ``exec`` the program has
    no capabilities, and none ever over the launcher's mount namespace (its tmpfs and
    read-only mounts stay as they are)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{PROGRAM_UID} 0 1"),
                       ("gid_map", f"{PROGRAM_UID} 0 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def exec_program(spec: dict, status_fd: int) -> None:
    """In the forked child: drop privileges, set limits, exec. Never returns."""
    try:
        os.close(status_fd)
        if spec["isolation"] == "namespaces":
            uid = spec["uid"]
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        elif spec["isolation"] == "user_namespaces":
            enter_nested_user_namespace()
        if spec["isolation"] != "rlimits":
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
    if spec["isolation"] != "rlimits":
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
