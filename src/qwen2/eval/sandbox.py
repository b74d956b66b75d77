"""Running generated code for execution-based evaluation (HumanEval pass@k, SPEC section 8; the
execution-feedback data synthesis of the paper's section 4.1 reuses it).

`run_program(code)` runs `code` in a fresh Python process, never in the evaluating one, and turns every
way it can go wrong into a status of a failed sample: "passed" (exit 0), "failed" (an exception or a
non-zero exit, refusals by the sandbox included), "timeout", "memory" or "error" (killed by another
signal, or the sandbox could not start). What enforces each limit:

* wall clock: the parent waits `timeout` seconds, then SIGKILLs the child's whole process group
  (the child is a session leader, `start_new_session`); the group is killed after *every* run, while
  the leader is still an unreaped zombie, so its id cannot have been reused and no grandchild survives
  unless it escaped with setsid(), which the blocked fork paths below make hard.
* CPU: RLIMIT_CPU = ceil(timeout) + 1 s (SIGXCPU, reported as "timeout"), for loops that outlive a
  parent that died.
* memory: RLIMIT_AS = `memory_mb` of address space; an allocation beyond it raises MemoryError, which
  the bootstrap reports with its own exit code as "memory".
* processes: RLIMIT_NPROC = the processes this uid already has + `max_processes` (threads count
  too). The kernel does not apply RLIMIT_NPROC to root, so when running as root the bound comes from
  the audit hook alone, and the hook then also refuses ctypes (the way around it, see below);
  libraries that load through ctypes (numpy among them) cannot be imported then.
* file size: RLIMIT_FSIZE = `file_size_mb` per file (stdout and stderr are files too; SIGXFSZ is
  ignored so an oversized write raises OSError instead of killing the process); RLIMIT_CORE = 0.
* output: stdout/stderr go to files outside the working folder, and only the first `max_output`
  characters of each are read back.
* network: the child calls unshare(CLONE_NEWUSER | CLONE_NEWNET) (os.unshare on Python >= 3.12, else
  libc through ctypes) and so sits in an empty network namespace, loopback down: 127.0.0.1 is not
  the evaluator's. Where the kernel refuses, only the audit hook's socket refusals remain.
  `SandboxResult.isolation` lists which of these layers were in force.
* filesystem: cwd, HOME and TMPDIR are a fresh temporary folder, deleted afterwards, with a minimal
  environment (no inherited variables). An audit hook (sys.addaudithook, installed before the user code
  runs) refuses open-for-write, os.remove/rename/rmdir/mkdir/chmod/chown/link/symlink/truncate/utime
  and shutil.rmtree on any path whose realpath is outside that folder (/dev/null excepted), and refuses
  os.system, os.exec*, os.spawn*, os.posix_spawn, os.fork/forkpty, subprocess.Popen, os.kill/killpg,
  socket connect/bind/sendto/sendmsg/getaddrinfo, and gc.get_objects/get_referrers/get_referents (the
  way to the hook's own closure). A refusal raises PermissionError in the program: a failed sample.

What an audit hook cannot stop, said plainly: it sees only what the interpreter reports. Code that
reaches libc directly (ctypes, cffi, a compiled extension) makes system calls the hook never sees:
writes, fork, exec, sockets. Against that only the kernel limits above hold (rlimits, the network
namespace, the process group kill); the filesystem outside the folder is then protected only by the
ordinary file permissions of the uid running the evaluation. A symlink swapped between the hook's
check and the open can also slip through. This is a sandbox for honest mistakes of a model (an
infinite loop, a huge allocation, a stray file write), not a security boundary against hostile code:
run untrusted code in a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MEMORY_EXIT = 117  # the bootstrap's exit code for a MemoryError in the program
SETUP_EXIT = 118  # the bootstrap's exit code for a sandbox that could not be set up


@dataclasses.dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    returncode: int | None  # negative: killed by that signal (subprocess's convention)
    stdout: str
    stderr: str
    seconds: float
    pid: int = 0  # the child's pid = its process group and session id
    isolation: tuple[str, ...] = ()  # layers in force: "netns", "nproc", "audit-hook", "no-ctypes"


# Runs in the child, before the program: limits, namespaces, the audit hook, then the program itself.
# Only the standard library; it is trusted code, the program is not.
_BOOTSTRAP = r"""
import json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
work = os.path.realpath(cfg["work"])
layers = []
try:
    def lim(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    lim(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)
    lim(resource.RLIMIT_FSIZE, cfg["fsize"])
    lim(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    uid, gid = os.getuid(), os.getgid()  # read before unshare: unmapped ids then read as 65534
    if uid != 0:  # the kernel skips RLIMIT_NPROC for root
        mine = 0
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/status") as f:
                    mine += any(l.startswith("Uid:") and l.split()[1] == str(uid) for l in f)
            except (OSError, ValueError):
                pass
        lim(resource.RLIMIT_NPROC, mine + cfg["nproc"])
        layers.append("nproc")
    flags = 0x10000000 | 0x40000000  # CLONE_NEWUSER | CLONE_NEWNET
    try:
        if hasattr(os, "unshare"):
            os.unshare(flags)
        else:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
                del sys.modules[m]
        # map our own ids into the new user namespace, or creating files fails with EOVERFLOW
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        layers.append("netns")
    except (OSError, AttributeError):
        pass  # no namespaces here: the hook's socket refusals are all there is
    no_ctypes = "nproc" not in layers
    if no_ctypes:
        layers.append("no-ctypes")
    layers.append("audit-hook")
    lim(resource.RLIMIT_AS, cfg["memory"])
except Exception as e:
    print(f"sandbox setup failed: {e!r}", file=sys.stderr)
    os._exit(118)
sys.stderr.write("@@isolation " + ",".join(layers) + "\n")
sys.stderr.flush()

def make_hook(work, no_ctypes):
    # everything the hook reads is immutable and local to this closure: the program cannot reach it
    # through __main__'s globals, and gc introspection (the way to its cells) is refused
    banned = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
              "os.killpg", "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind", "socket.sendto",
              "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
              "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
    if no_ctypes:
        banned |= {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata",
                   "ctypes.cdata/buffer", "ctypes.call_function"}
    banned = frozenset(banned)
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                   "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.link": 2,
                   "os.symlink": 2, "os.setxattr": 1, "os.removexattr": 1, "os.mkfifo": 1, "os.mknod": 1}
    path_events = tuple(path_events.items())
    write = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, fsdecode, prefix = os.path.realpath, os.fsdecode, work + os.sep

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        p = realpath(fsdecode(path))
        return p == work or p.startswith(prefix) or p == "/dev/null"

    def hook(event, args):
        if event in banned:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(flags, int) and flags & write) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working folder is not allowed")
            return
        for name, n in path_events:
            if event == name:
                for path in args[:n]:
                    if path is not None and not inside(path):
                        raise PermissionError(
                            f"sandbox: {event} on {path!r} outside the working folder is not allowed")
    return hook

with open(cfg["program"], encoding="utf-8") as f:
    source = f.read()
sys.addaudithook(make_hook(work, no_ctypes))
del cfg, f, make_hook, work, no_ctypes, layers
for name in ("ctypes", "libc"):  # the bootstrap's own handles on libc, if it used ctypes for unshare
    globals().pop(name, None)
glb = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(source, "<program>", "exec"), glb)
except MemoryError:
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(117)
"""


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(4 * limit)  # a character is at most 4 bytes of UTF-8
    return data.decode("utf-8", errors="replace")[:limit]


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or `deadline`, leaving it unreaped (WNOWAIT) so its process group id stays
    reserved for the kill that follows. True if it exited."""
    pause = 0.002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored by the embedding program)
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def run_program(
    code: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output: int = 64_000,
    max_processes: int = 32,
    file_size_mb: int = 64,
) -> SandboxResult:
    """Run the Python program `code` in a sandboxed child process (the limits are in the module
    docstring) and return how it ended. Never raises for anything the program does; safe to call from
    several threads at once."""
    root = tempfile.mkdtemp(prefix="qwen2-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        program = os.path.join(root, "program.py")  # outside the folder: the program cannot rewrite it
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        cfg = {
            "work": work,
            "program": program,
            "cpu": math.ceil(timeout) + 1,
            "nproc": max_processes,
            "memory": memory_mb << 20,
            "fsize": file_size_mb << 20,
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONHASHSEED": "0",
        }
        start = time.monotonic()
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(cfg)],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                return SandboxResult(
                    "error",
                    None,
                    "",
                    f"sandbox: cannot start {sys.executable}: {e}",
                    time.monotonic() - start,
                )
            try:
                exited = _wait_exited(proc.pid, start + timeout)
            finally:
                _killpg(proc.pid)  # the whole group, every time: no stray grandchildren
                returncode = proc.wait()
        seconds = time.monotonic() - start
        stdout = _read(out.name, max_output)
        stderr = _read(err.name, max_output + 200)
        isolation: tuple[str, ...] = ()
        if stderr.startswith("@@isolation "):
            line, _, stderr = stderr.partition("\n")
            isolation = tuple(x for x in line.split(" ", 1)[1].split(",") if x)
        stderr = stderr[:max_output]
        if not exited or returncode == -signal.SIGXCPU:
            status = "timeout"
        elif returncode == 0:
            status = "passed"
        elif returncode == MEMORY_EXIT:
            status = "memory"
        elif returncode == SETUP_EXIT or returncode < 0:
            status = "error"
        else:
            status = "failed"
        return SandboxResult(status, returncode, stdout, stderr, seconds, proc.pid, isolation)
    finally:
        shutil.rmtree(root, ignore_errors=True)
