"""The code sandbox (qwen2.eval.sandbox): every limit ends as a failed sample, never a hung or crashed
evaluation, and leaves nothing behind (no stray processes, no files outside the working folder)."""

import os
import socket
import threading
import time

import pytest

from qwen2.eval.sandbox import run_program


def processes_in_session(sid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                found.append(int(name))
    return found


def test_a_passing_program_and_its_output():
    r = run_program("import math\nprint(math.factorial(5))\n")
    assert r.status == "passed" and r.returncode == 0 and r.stdout == "120\n"
    assert "audit-hook" in r.isolation


def test_a_failing_assert_is_failed_with_the_traceback():
    r = run_program("def f():\n    return 1\nassert f() == 2\n")
    assert r.status == "failed" and r.returncode == 1 and "AssertionError" in r.stderr


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and time.monotonic() - start < 5


def test_a_sleeping_program_times_out_on_the_wall_clock():
    r = run_program("import time\ntime.sleep(60)\n", timeout=0.5)
    assert r.status == "timeout" and r.seconds < 3


def test_a_10_gb_allocation_is_a_memory_failure():
    r = run_program("x = bytearray(10 * 1024 ** 3)\nprint('allocated')\n")  # the default 1024 MB
    assert r.status == "memory" and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_a_fork_bomb_is_bounded_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    os.fork()\n"
    r = run_program(bomb, timeout=3.0)
    assert r.status in ("failed", "timeout")
    assert processes_in_session(r.pid) == []


def test_a_ctypes_fork_bomb_is_bounded_and_leaves_no_process():
    # past the audit hook: RLIMIT_NPROC bounds it (non-root), or ctypes is refused (root, where the kernel
    # does not apply RLIMIT_NPROC); the process group is killed either way
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    r = run_program(bomb, timeout=2.0, max_processes=16)
    assert r.status in ("failed", "timeout")
    if os.getuid() == 0:
        assert "no-ctypes" in r.isolation and "ctypes.dlopen is not allowed" in r.stderr
    else:
        assert "nproc" in r.isolation
    time.sleep(0.1)
    assert processes_in_session(r.pid) == []


def test_a_grandchild_left_running_is_killed_with_the_group():
    # a program whose child outlives it (exit while a forked sleeper runs, via ctypes if allowed)
    code = (
        "import os, sys\ntry:\n    pid = os.fork()\nexcept PermissionError:\n    sys.exit(0)\n"
        "if pid == 0:\n    import time; time.sleep(60)\n"
    )
    r = run_program(code, timeout=2.0)
    assert processes_in_session(r.pid) == []


def test_a_socket_connect_to_a_listening_port_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3.0)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    code = (
        f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        "print('connected')\n"
    )
    r = run_program(code, timeout=5.0)
    thread.join()
    server.close()
    assert r.status == "failed" and "connected" not in r.stdout
    assert accepted == []


def test_the_network_namespace_holds_only_a_loopback_where_the_kernel_allows_it():
    code = "print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))\n"
    r = run_program(code)
    assert r.status == "passed"
    if "netns" not in r.isolation:
        pytest.skip("this kernel refuses unprivileged user+network namespaces: only the audit hook applies")
    assert r.stdout == "['lo']\n"


def test_writing_outside_the_folder_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "failed" and "outside the working folder" in r.stderr
    assert not target.exists()
    r = run_program(f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')\n")
    assert r.status == "failed" and not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    r = run_program(f"import os\nos.remove({str(keep)!r})\n")
    assert r.status == "failed" and keep.read_text() == "mine"
    r = run_program(f"import os\nos.rename({str(keep)!r}, 'stolen')\n")
    assert r.status == "failed" and keep.read_text() == "mine"
    r = run_program(f"import os\nfd = os.open({str(keep).encode()!r}, os.O_WRONLY | os.O_TRUNC)\n")
    assert r.status == "failed" and keep.read_text() == "mine"


def test_writing_inside_the_folder_works_and_home_and_tmpdir_point_there():
    code = (
        "import os, tempfile\nopen('a.txt', 'w').write('hi')\n"
        "assert os.environ['HOME'] == os.getcwd() == tempfile.gettempdir()\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\nprint(open('a.txt').read())\n"
    )
    r = run_program(code)
    assert r.status == "passed", r.stderr
    assert r.stdout == "hi\n"


def test_os_system_and_subprocess_are_refused(tmp_path):
    marker = tmp_path / "ran"
    r = run_program(f"import os\nos.system('touch {marker}')\n")
    assert r.status == "failed" and "os.system is not allowed" in r.stderr and not marker.exists()
    r = run_program(f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])\n")
    assert r.status == "failed" and not marker.exists()


def test_huge_output_is_truncated():
    r = run_program(
        "import sys\nsys.stdout.write('x' * 5_000_000)\nsys.stderr.write('e' * 5_000_000)\n", max_output=1000
    )
    assert r.status == "passed"
    assert r.stdout == "x" * 1000 and r.stderr == "e" * 1000


def test_output_past_the_file_size_limit_fails_the_sample():
    r = run_program("import sys\nsys.stdout.write('x' * (3 << 20))\nsys.stdout.flush()\n", file_size_mb=1)
    assert r.status == "failed" and len(r.stdout) <= 64_000


def test_no_environment_leaks_into_the_program(monkeypatch):
    monkeypatch.setenv("QWEN2_SECRET_FOR_TEST", "s3cret")
    r = run_program("import os\nprint(sorted(os.environ))\n")
    assert r.status == "passed" and "QWEN2_SECRET_FOR_TEST" not in r.stdout


@pytest.mark.parametrize("code", ["raise SystemExit(3)", "import sys\nsys.exit('bye')", "1/0"])
def test_other_exits_are_failures(code):
    assert run_program(code).status == "failed"
