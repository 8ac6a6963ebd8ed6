"""The build box launcher: ``python -I -S _box.py <config>`` runs one toolchain command in a box.

Started by :func:`fnserver.builder._proc.run_tool` for every toolchain process, with the whole
configuration in ``argv[1]`` (hex of :func:`marshal.dumps` of a dict, written by the server with
the same interpreter). It is run as a plain script with ``-I -S`` and imports nothing but the
standard library's cheapest modules: it starts in about 20 ms, where importing fnserver would
cost several times that on every build.

When the configuration asks for a box (the server runs as root), the launcher

1. puts itself in the build's memory cgroup, so everything it starts is counted from birth;
2. unshares mount, pid, network, IPC and UTS namespaces and forks: the child is pid 1 of the
   new pid namespace, so when it (the toolchain) ends, the kernel kills whatever it left;
3. in the child: mounts a small tmpfs as the new root, binds into it, read-only, only what the
   build may see (the toolchain, the upload's source) and, writable, the build's own scratch
   directories; mounts each shared cache as an overlay whose upper layer lives on a tmpfs of
   this namespace (the build reads the warm cache, its writes die with it); a fresh ``/proc``
   and the few device files toolchains open; makes the root read-only and ``pivot_root``s into
   it, detaching the host's tree entirely;
4. sets the rlimits, drops to the build uid (``setgroups([])``, ``setresgid``, ``setresuid``:
   every capability goes), sets ``no_new_privs`` and execs the tool.

Any failure before the exec is written to the error pipe (``errfd``) and the launcher exits with
status 125; the server reports it as a broken build box, never as the user's build failure.
Without a box (not root) the launcher only sets the rlimits and execs: the same limits as before,
without forking the server's Python process (``preexec_fn``) for them.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import signal
import sys

TYPE_CHECKING = False  # typing costs an import; mypy reads the block below anyway
if TYPE_CHECKING:
    from typing import Any

    Config = dict[str, Any]

SETUP_FAILED = 125

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
# pivot_root has no glibc wrapper: the raw syscall, by architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41,
                   "ppc64le": 203, "s390x": 217}
_RLIMITS = {
    "AS": resource.RLIMIT_AS,
    "CORE": resource.RLIMIT_CORE,
    "FSIZE": resource.RLIMIT_FSIZE,
    "NPROC": resource.RLIMIT_NPROC,
    "NOFILE": resource.RLIMIT_NOFILE,
}

_libc = ctypes.CDLL(None, use_errno=True)


class _SetupError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise _SetupError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(
        _libc.mount(
            source and source.encode(), target.encode(), fstype and fstype.encode(),
            ctypes.c_ulong(flags), data and data.encode(),
        ),
        f"mount {fstype or 'bind'} on {target}",
    )


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _make_target(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _bind(root: str, host: str, inside: str, writable: bool, device: bool = False) -> None:
    target = root + inside
    _make_target(target, os.path.isdir(host))
    _mount(host, target, None, _MS_BIND)
    # A bind takes the flags of the remount that follows: read-only unless writable, and
    # never a way to a set-uid program or (but for the device files themselves) a device.
    flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID
    if not device:
        flags |= _MS_NODEV
    if not writable:
        flags |= _MS_RDONLY
    if device:
        flags |= _MS_NOEXEC
    _mount(None, target, None, flags)


def _overlays(root: str, cfg: Config) -> None:
    """Each shared cache read-only below, a per-build writable layer above, on a tmpfs that
    lives in this namespace only (and counts in the build's memory cgroup)."""
    overlays = cfg.get("overlays") or []
    if not overlays:
        return
    layers = cfg["overlay_dir"]
    _mount("tmpfs", layers, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={cfg['overlay_size']},mode=0700")
    uid = cfg.get("uid")
    for i, (lower, inside) in enumerate(overlays):
        for ch in ",:\\":
            if ch in lower:
                raise _SetupError(f"a cache path may not hold {ch!r}")
        upper = f"{layers}/{i}/upper"
        work = f"{layers}/{i}/work"
        os.makedirs(upper, mode=0o755)
        os.makedirs(work, mode=0o700)
        if uid is not None:
            # The merged root takes the upper layer's owner: the build may write its cache.
            os.chown(upper, uid, cfg["gid"])
        target = root + inside
        _make_target(target, True)
        _mount("overlay", target, "overlay", _MS_NOSUID | _MS_NODEV,
               f"lowerdir={lower},upperdir={upper},workdir={work}")


def _pivot(root: str) -> None:
    os.chdir(root)
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is not None and _libc.syscall(ctypes.c_long(nr), b".", b".") == 0:
        # The host's tree is now stacked under "/": detach it, nothing of it stays reachable.
        _check(_libc.umount2(b".", _MNT_DETACH), "umount2 of the old root")
    else:
        _check(_libc.chroot(b"."), "chroot")
    os.chdir("/")


def _enter_box(cfg: Config) -> None:
    root = cfg["root"]
    # Mounts made from here on must not propagate back to the host.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    # A scratch /tmp first: binds below /tmp (a scratch dir there) then land inside it.
    tmp = root + "/tmp"
    os.makedirs(tmp, mode=0o755)
    _mount("tmpfs", tmp, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64m,mode=1777")
    for host, inside, writable in cfg["binds"]:
        _bind(root, host, inside, writable)
    _overlays(root, cfg)
    for dev in cfg.get("devices", ()):
        _bind(root, dev, dev, True, device=True)
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    _pivot(root)


def _limits(cfg: Config) -> None:
    for name, value in cfg.get("rlimits", {}).items():
        resource.setrlimit(_RLIMITS[name], (value, value))
    os.nice(cfg.get("nice", 0))  # the tool and everything it starts


def _drop(cfg: Config) -> None:
    uid = cfg.get("uid")
    if uid is not None:
        gid = cfg["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise _SetupError("the uid did not change")
        # A uid change clears the death signal: set it again.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _exec(cfg: Config, errfd: int) -> None:
    _limits(cfg)
    _drop(cfg)
    os.umask(cfg.get("umask", 0o022))
    os.chdir(cfg["cwd"])
    if errfd >= 0:
        os.set_inheritable(errfd, False)  # closed by the exec: EOF tells the server it worked
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def _fail(errfd: int, msg: str) -> None:
    if errfd >= 0:
        try:
            os.write(errfd, msg.encode("utf-8", "replace")[:4096])
        except OSError:
            pass
    os._exit(SETUP_FAILED)


def _child(cfg: Config, errfd: int) -> None:
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _enter_box(cfg)
        _exec(cfg, errfd)
    except (OSError, _SetupError, ValueError, KeyError) as exc:
        _fail(errfd, f"{type(exc).__name__}: {exc}")


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    """Run the configured command, boxed or not; see the module docstring."""
    cfg = marshal.loads(bytes.fromhex(argv[1]))
    errfd = cfg.get("errfd", -1)
    if not cfg.get("box"):
        try:
            _exec(cfg, errfd)
        except (OSError, _SetupError, ValueError, KeyError) as exc:
            _fail(errfd, f"{type(exc).__name__}: {exc}")
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        procs = cfg.get("cgroup_procs")
        if procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
        if cfg.get("netns", True):
            flags |= _CLONE_NEWNET
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
        pid = os.fork()
    except (OSError, _SetupError) as exc:
        _fail(errfd, f"{type(exc).__name__}: {exc}")
    if pid == 0:
        _child(cfg, errfd)
        os._exit(SETUP_FAILED)  # not reached: _child execs or exits
    if errfd >= 0:
        os.close(errfd)  # the child's copy is the one that tells
    return _wait(pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
