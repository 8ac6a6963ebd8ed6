"""The attackers of tests/test_attacks.py: hostile C programs (built with ``zig cc`` into
static native executables), hostile sources for the builder, and compile-bomb wasm modules.

Each C program prints one line per attempt, so that a test can say which attempt got through;
none of them knows what the server does to stop it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Final

from .test_exec import C_SOURCES as EXEC_SOURCES

__all__ = [
    "BUILD_HUGE_ARRAY_GO",
    "BUILD_HUGE_ARRAY_READ_GO",
    "C_SOURCES",
    "build_natives",
    "compile_bomb",
    "include_source",
]

C_SOURCES: Final = {
    # Echo stdin to stdout: the bystander that must keep being served.
    "echo": r"""
#include <unistd.h>
int main(void) {
    char b[65536]; ssize_t n;
    while ((n = read(0, b, sizeof b)) > 0) write(1, b, n);
    return 0;
}""",
    # The code swap. argv: 1 the victim's compiled module, 2 the attacker's compiled module,
    # 3 the module cache directory, 4 a file name to plant there (the victim's cache key with
    # the digest of the attacker's bytes), 5 the victim's version directory, 6 the attacker's
    # main.wasm. Every attempt that succeeds prints DONE.
    "vandal": r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static char mod[8 << 20], wasm[1 << 20];
static ssize_t nmod = -1, nwasm = -1;
static void report(const char *what, int ok) {
    printf("%s:%s\n", what, ok ? "DONE" : strerror(errno));
}
static ssize_t load(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap);
    close(fd);
    return n;
}
static int put(const char *path, int flags, const char *buf, ssize_t n) {
    int fd = open(path, flags, 0644);
    if (fd < 0) return 0;
    int ok = write(fd, buf, n) == n;
    close(fd);
    return ok;
}
int main(int argc, char **argv) {
    char path[4096];
    if (argc < 7) return 2;
    nmod = load(argv[2], mod, sizeof mod);
    report("read-attacker-module", nmod > 0);
    if (nmod <= 0) { memset(mod, 'X', 4096); nmod = 4096; }
    nwasm = load(argv[6], wasm, sizeof wasm);
    report("read-attacker-wasm", nwasm > 0);
    if (nwasm <= 0) { memset(wasm, 'X', 4096); nwasm = 4096; }
    report("overwrite-module", put(argv[1], O_WRONLY | O_TRUNC, mod, nmod));
    report("chmod-module", chmod(argv[1], 0666) == 0);
    report("rename-onto-module", rename(argv[2], argv[1]) == 0);
    report("unlink-module", unlink(argv[1]) == 0);
    report("recreate-module", put(argv[1], O_WRONLY | O_CREAT | O_EXCL, mod, nmod));
    snprintf(path, sizeof path, "%s/%s", argv[3], argv[4]);
    report("plant-module", put(path, O_WRONLY | O_CREAT | O_EXCL, mod, nmod));
    snprintf(path, sizeof path, "%s/main.wasm", argv[5]);
    report("overwrite-wasm", put(path, O_WRONLY | O_TRUNC, wasm, nwasm));
    snprintf(path, sizeof path, "%s/meta.json", argv[5]);
    report("append-meta", put(path, O_WRONLY | O_APPEND, "{}", 2));
    snprintf(path, sizeof path, "%s/main.0000000000000000.cwasm", argv[5]);
    report("plant-version", put(path, O_WRONLY | O_CREAT | O_EXCL, mod, nmod));
    return 0;
}""",
    # Reading the data directory. argv[1] is the data directory. Explores it, the directories
    # above its own binary (/proc/self/exe), and the views of the host a /proc may still
    # offer (its parent's root and open descriptors): "L dir name" per entry seen, "R path
    # text" per file read (the first bytes, unprintables as '.').
    "peek": r"""
#include <dirent.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static void show_file(const char *path) {
    char b[256];
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    ssize_t n = read(fd, b, sizeof b);
    close(fd);
    if (n < 0) return;
    for (ssize_t i = 0; i < n; i++) if (b[i] < 32 || b[i] > 126) b[i] = '.';
    printf("R %s %.*s\n", path, (int)n, b);
}
static void explore(const char *dir, int depth) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[4096];
    struct stat st;
    if (!d) return;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        printf("L %s %s\n", dir, e->d_name);
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (lstat(path, &st) != 0) continue;
        if (S_ISREG(st.st_mode)) show_file(path);
        else if (S_ISDIR(st.st_mode) && depth > 0) explore(path, depth - 1);
    }
    closedir(d);
}
int main(int argc, char **argv) {
    char exe[4096], up[4096], path[4096];
    const char *data = argv[1];
    explore(data, 3);
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        printf("X %s\n", exe);
        strcpy(up, exe);
        for (int k = 0; k < 3; k++) {
            strcpy(up, dirname(up));
            if (!strcmp(up, "/") || !strcmp(up, ".")) break;
            explore(up, 2);
        }
    }
    pid_t pp = getppid();
    snprintf(path, sizeof path, "/proc/self/root%s", data);
    explore(path, 2);
    snprintf(path, sizeof path, "/proc/%d/root%s", (int)pp, data);
    explore(path, 2);
    snprintf(path, sizeof path, "/proc/%d/cwd", (int)pp);
    explore(path, 1);
    for (int fd = 0; fd < 256; fd++) {
        snprintf(path, sizeof path, "/proc/%d/fd/%d%s", (int)pp, fd, data);
        explore(path, 2);
        snprintf(path, sizeof path, "/proc/self/fd/%d%s", fd, data);
        explore(path, 2);
    }
    puts("end");
    return 0;
}""",
    # Reading the server's command line. argv: pids to try directly (the server's). Walks
    # /proc: "P pid" per process seen, "C pid text" and "E pid text" for the command lines
    # and environments it can read, "T pid what:ok|errno" per direct try.
    "pswalk": r"""
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static char buf[1 << 16];
static int slurp(const char *path, const char *tag, const char *pid) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 0) return 0;
    for (ssize_t i = 0; i < n; i++) if (buf[i] == 0 || buf[i] == '\n') buf[i] = ' ';
    printf("%s %s %.*s\n", tag, pid, (int)n, buf);
    return 1;
}
int main(int argc, char **argv) {
    char path[512];
    printf("self %d %d\n", (int)getpid(), (int)getppid());
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
        printf("P %s\n", e->d_name);
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        slurp(path, "C", e->d_name);
        snprintf(path, sizeof path, "/proc/%s/environ", e->d_name);
        slurp(path, "E", e->d_name);
    }
    for (int i = 1; i < argc; i++) {
        const char *what[] = {"cmdline", "environ", "status"};
        for (int w = 0; w < 3; w++) {
            snprintf(path, sizeof path, "/proc/%s/%s", argv[i], what[w]);
            int ok = slurp(path, "C", argv[i]);
            printf("T %s %s:%s\n", argv[i], what[w], ok ? "ok" : strerror(errno));
        }
    }
    return 0;
}""",
    # A file left behind. argv[1] "w": plants file argv[2] in /tmp, /var/tmp, /dev/shm, the
    # working directory, its parent, and every directory one level below those;
    # "r": looks for argv[2] in the same places ("FOUND path").
    "litter": r"""
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static const char *bases[] = {"/tmp", "/var/tmp", "/dev/shm", ".", ".."};
static void visit(const char *dir, const char *name, int write_mode) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (write_mode) {
        int fd = open(path, O_WRONLY | O_CREAT, 0666);
        if (fd >= 0) { write(fd, "left", 4); close(fd); printf("wrote %s\n", path); }
    } else if (access(path, F_OK) == 0) {
        printf("FOUND %s\n", path);
    }
}
int main(int argc, char **argv) {
    int w = argv[1][0] == 'w';
    char sub[4096];
    struct stat st;
    for (int i = 0; i < 5; i++) {
        visit(bases[i], argv[2], w);
        DIR *d = opendir(bases[i]);
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(sub, sizeof sub, "%s/%s", bases[i], e->d_name);
            if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode)) visit(sub, argv[2], w);
        }
        if (d) closedir(d);
    }
    puts("end");
    return 0;
}""",
    # Forks at its first instruction (a constructor, before main); the child raises every
    # soft limit it can to its hard limit, then tries to escape the call's limits while the
    # parent waits for it (argv[1]): "m" touch 1 GiB of malloc'd memory, "f" write a 100 MiB
    # file in /tmp, "s" spin; "o": the child spins in a session of its own while the parent
    # exits at once (outlive the call).
    "forkfirst": r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
static pid_t child = -1;
__attribute__((constructor)) static void first(void) { child = fork(); }
int main(int argc, char **argv) {
    char mode = argc > 1 ? argv[1][0] : 'm';
    if (child == 0) {
        int limits[] = {RLIMIT_FSIZE, RLIMIT_CPU, RLIMIT_AS, RLIMIT_DATA, RLIMIT_NPROC};
        for (int i = 0; i < 5; i++) {
            struct rlimit r;
            if (getrlimit(limits[i], &r) == 0) { r.rlim_cur = r.rlim_max; setrlimit(limits[i], &r); }
        }
        if (mode == 'm') {
            size_t n = 1UL << 30;
            volatile char *p = malloc(n);
            if (!p) { puts("child: malloc refused"); _exit(3); }
            for (size_t i = 0; i < n; i += 4096) p[i] = 1;
            puts("child: touched 1 GiB");
        } else if (mode == 'f') {
            static char b[1 << 16];
            memset(b, 'x', sizeof b);
            int fd = open("/tmp/fork-first-left", O_WRONLY | O_CREAT | O_TRUNC, 0644);
            size_t total = 0;
            while (fd >= 0 && total < (100UL << 20)) {
                ssize_t w = write(fd, b, sizeof b);
                if (w <= 0) break;
                total += (size_t)w;
            }
            printf("child: wrote %zu\n", total);
        } else {
            if (mode == 'o') setsid();
            for (;;) {}
        }
        fflush(stdout);
        _exit(0);
    }
    if (child < 0) { puts("parent: fork refused"); return 4; }
    if (mode == 'o') { printf("parent: left %d\n", (int)child); return 0; }
    int st = 0;
    waitpid(child, &st, 0);
    if (WIFSIGNALED(st)) printf("parent: child signal %d\n", WTERMSIG(st));
    else printf("parent: child exit %d\n", WEXITSTATUS(st));
    return 0;
}""",
    # Touches a 1 GiB MAP_SHARED | MAP_ANONYMOUS region (not private memory: RLIMIT_DATA does
    # not count it).
    "shmhog": r"""
#include <stdio.h>
#include <sys/mman.h>
int main(void) {
    size_t n = 1UL << 30;
    char *m = mmap(0, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { puts("mmap refused"); return 3; }
    for (size_t i = 0; i < n; i += 4096) m[i] = 1;
    puts("touched 1 GiB shared");
    return 0;
}""",
    # The classic: every process forks forever.
    "forkbomb": r"""
#include <unistd.h>
int main(void) { for (;;) fork(); }""",
    # Tries to kill the process that started it (its worker), then every process it may
    # signal. kill(0) would be its own process group: a parent it cannot see is not tried.
    "regicide": r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    pid_t pp = getppid();
    if (pp > 1) printf("parent:%s\n", kill(pp, SIGKILL) == 0 ? "KILLED" : strerror(errno));
    else puts("parent:not visible");
    fflush(stdout);
    kill(-1, SIGKILL);  /* returns 0 whenever any other process exists: judged by its effect */
    puts("survived");
    return 0;
}""",
    # Talks to itself over 127.0.0.1, then tries the host's port argv[1]: the exec tests' own.
    "loopback": EXEC_SOURCES["loopback"],
}

#: Issue 9's huge-array source as it was reported. Go 1.27.3 initialises this sparse array at
#: run time (only big[0] is read): a 1.9 MB binary, measured.
BUILD_HUGE_ARRAY_GO: Final = "package main\nvar big = [1<<28]byte{1}\nfunc main(){_ = big[0]}\n"
#: The same array read at a computed index: Go 1.27.3 then stores all 256 MiB of it in the
#: native binary, from 88 bytes of source (measured: a 270 MB main.bin; the main.wasm stays
#: 1.9 MB, its data segments leave out the zeros).
BUILD_HUGE_ARRAY_READ_GO: Final = (
    "package main\nvar big = [1<<28]byte{1}\nfunc main(){ println(big[len(big)-1], len(big)) }\n"
)


def include_source(path: str) -> str:
    """A C upload that includes a host file by its absolute path."""
    return f'#include "{path}"\nint main(void) {{ return 0; }}\n'


def _zig_target() -> str:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                      platform.machine().lower())
    return f"{arch}-linux-musl"


def build_natives(out: Path) -> dict[str, Path]:
    """Every program of :data:`C_SOURCES` as a static executable in ``out``, built with the
    zig cc the server itself depends on (musl, so no host libc is needed)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    built: dict[str, Path] = {}
    for name, src in C_SOURCES.items():
        (out / f"{name}.c").write_text(src)
        built[name] = out / name
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ziglang", "cc", "-target", _zig_target(), "-static", "-O1",
             "-o", str(built[name]), str(out / f"{name}.c")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # zig's global cache keeps musl built between runs (the first build takes ~1 min).
            env={**os.environ},
        )
    failures = []
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{name}: {log.decode(errors='replace')[:800]}")
    if failures:  # our own sources: a failure here is a bug in this file
        raise RuntimeError("zig cc failed:\n" + "\n".join(failures))
    return built


# -- compile bombs ----------------------------------------------------------------------------


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _section(ident: int, body: bytes) -> bytes:
    return bytes([ident]) + _leb(len(body)) + body


def _vec(items: list[bytes]) -> bytes:
    return _leb(len(items)) + b"".join(items)


def compile_bomb(depth: int, salt: int = 0) -> bytes:
    """A valid WASI command whose one function nests ``depth`` loops over ``depth`` i64 locals,
    each level adding two locals into a third and branching back while one is zero.

    Tiny (18 KB at depth 1000) but slow to compile: every local is live across every loop
    header, so cranelift's SSA construction and register allocation grow about cubically
    (measured with fnserver's engine on 2 vCPUs: depth 1000 ~5 s and 550 MiB, depth 1500
    ~14 s and 1.2 GiB). ``salt`` changes the bytes (and so the digest) only."""
    body = bytearray()
    for d in range(depth):
        a, b, c = (d * 7 + salt) % depth, (d * 13 + 1) % depth, (d + 2) % depth
        body += b"\x03\x40"  # loop (empty block type)
        body += b"\x20" + _leb(a) + b"\x20" + _leb(b) + b"\x7c" + b"\x21" + _leb(c)  # c = a + b
    for d in range(depth):
        body += b"\x20" + _leb(d) + b"\x50\x0d\x00\x0b"  # br_if 0 (local d == 0); end
    types = _section(1, _vec([b"\x60\x00\x00"]))  # () -> ()
    funcs = _section(3, _vec([_leb(0)]))
    memory = _section(5, _vec([b"\x00\x01"]))  # one page, no maximum
    exports = _section(7, _vec([b"\x06_start\x00\x00", b"\x06memory\x02\x00"]))
    code_body = _vec([_leb(depth) + b"\x7e"]) + bytes(body) + b"\x0b"
    code = _section(10, _vec([_leb(len(code_body)) + code_body]))
    return b"\0asm\x01\0\0\0" + types + funcs + memory + exports + code
