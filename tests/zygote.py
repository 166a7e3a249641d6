"""A fork server for the Python processes the tests start: each one otherwise spends ~10 s of its CPU (on the
2-core dev VM) importing torch and transformers before it does anything, and the slow tests start hundreds.

`install()` (tests/conftest.py, in each pytest process) makes `subprocess.Popen` hand a command of the form
`python -m runner ...` or `python tests/SCRIPT.py ...` (and `python -c CODE` where the environment has
RUNNER_TEST_FORK=1) to a server that imported runner, torch and transformers once and forks a child for each
command. The child is a real process with its own pid: signals (SIGKILL included) reach it, its exit status comes
back as waitpid gives it (and it stays a zombie until the test waits for it), its stdin/stdout/stderr are the
pipes or files the test asked for, and it runs the command the way the interpreter would (`runpy`, argv,
sys.path[0], cwd, environment, exit code, uncaught KeyboardInterrupt killing it by SIGINT, torch's and numpy's
generators seeded afresh).

What a child cannot have is a fresh interpreter: runner, torch and transformers are imported already, in that
order, and PYTHONHASHSEED is the server's. So any other command (`python -c`, whose tests are about interpreter
start: imports and their order), any command whose environment differs from `workers.worker_env()` (as the
session began) in a variable read as those imports run (IMPORT_TIME_*: OMP_NUM_THREADS or an OpenMP wait
setting, say, which take effect when torch loads), a command whose environment has RUNNER_TEST_EXEC=1, and every
command while RUNNER_TEST_ZYGOTE=0 runs as a plain process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve()
TESTS = HERE.parent
PRELOAD = (
    "runner",  # first: its OpenMP wait setting must precede torch, as in the `runner` command
    "runner.cli",
    "runner.worker",
    "runner.api",
    "runner.engine",
    "runner.scoring",
    "runner.results",
    "torch",
    "transformers",
    "pandas",
    "pyarrow.parquet",
)
PRELOAD_ATTRS = ("GPT2LMHeadModel", "LlamaForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast",
                 "GPT2TokenizerFast", "LlamaTokenizerFast")  # fmt: skip
# What the interpreter, torch, its OpenMP/MKL runtimes, transformers, huggingface_hub, pyarrow and the C library
# read as they load (or cache then): a command whose environment differs from the server's in one of these
# needs a fresh interpreter. Anything else (RUNNER_*, PATH, a setting Ray or a benchmark put in the session's
# environment) is read when used, and the child has its own environment.
IMPORT_TIME_PREFIXES = ("PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "DNNL_", "ONEDNN_", "LD_", "TORCH",
                        "PYTORCH_", "CUDA", "NVIDIA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "ARROW_", "LC_",
                        "MALLOC_", "XDG_")  # fmt: skip
IMPORT_TIME_VARS = ("LANG", "LANGUAGE", "HOME", "TMPDIR", "TEMP", "TMP", "TZ", "USE_TORCH", "USE_TF")
READ_WHEN_USED = ("PYTHONBREAKPOINT",)  # (Ray's driver sets it; breakpoint() reads it)
_HEADER = struct.Struct("!q")
_RealPopen = subprocess.Popen


def env_key(env) -> tuple:
    """The part of an environment that must match the server's: what is read as the server's imports run."""
    return tuple(sorted((k, v) for k, v in env.items() if _read_at_import(k)))


def _read_at_import(name: str) -> bool:
    if name in READ_WHEN_USED or name.startswith(
        "TORCHINDUCTOR_"
    ):  # (torch sets its cache dir when it compiles)
        return False
    return name in IMPORT_TIME_VARS or name.startswith(IMPORT_TIME_PREFIXES)


# ---- the server: python tests/zygote.py LISTEN_FD ----


class _Server:
    """One listening socket, one connection per child (kept until the test has read the child's status), and a
    pidfd per child: a child that ended stays a zombie, as under subprocess.Popen, until the test waits for it."""

    def __init__(self, listen_fd: int):
        self.listener = socket.socket(fileno=listen_fd)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.sel.register(os.pidfd_open(os.getppid()), selectors.EVENT_READ, ("parent", None))

    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                what, pid = key.data
                if what == "parent":  # the pytest process is gone: so is the reason to serve
                    return
                if what == "accept":
                    self.accept()
                elif what == "exited":
                    self.report(key, pid)
                else:  # the test read the status (or went away): reap
                    self.reap(key, pid)

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        request, fds = _receive(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(
                request, fds, [self.sel.fileno(), conn.fileno(), *(k.fd for k in self.sel.get_map().values())]
            )
        for fd in fds:
            os.close(fd)
        conn.sendall(_HEADER.pack(pid))
        self.sel.register(os.pidfd_open(pid), selectors.EVENT_READ, ("exited", (pid, conn)))

    def report(self, key, child) -> None:
        """The child ended: its status (not reaped yet, WNOWAIT) to the test."""
        pid, conn = child
        self.sel.unregister(key.fd)
        os.close(key.fd)
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        status = info.si_status << 8 if info.si_code == os.CLD_EXITED else info.si_status
        try:
            conn.sendall(_HEADER.pack(status | (0x80 if info.si_code == os.CLD_DUMPED else 0)))
        except OSError:
            pass  # the test no longer waits for it
        self.sel.register(conn, selectors.EVENT_READ, ("read", (pid, conn)))

    def reap(self, key, child) -> None:
        """The test read the status and asks for the reap ("r"), which is done before it hears back: as with
        waitpid, once wait() returns the pid is gone (runner takes a zombie for a live writer)."""
        pid, conn = child
        self.sel.unregister(conn)
        asked = conn.recv(1)
        os.waitpid(pid, 0)
        try:
            if asked:
                conn.sendall(b"k")
        except OSError:
            pass
        conn.close()


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    transformers = sys.modules["transformers"]
    for attr in PRELOAD_ATTRS:
        getattr(transformers, attr)
    # what was imported leaves the garbage collector's view, in the server and every child (as CPython's docs
    # advise before fork): a child's full collections (its own, and runner's gc.collect at an engine switch)
    # scanned it all, and touched every object's header, copying the pages fork shared
    import gc

    gc.collect()
    gc.freeze()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    (size,) = _HEADER.unpack(head)
    return json.loads(_recv_exactly(conn, size)), fds


# ---- the child: what the interpreter would do with `python ARGS...` ----


def _child(request: dict, fds: list[int], server_fds: list[int]) -> None:
    code = 70
    try:
        _become(request, fds, server_fds)
    except BaseException:  # noqa: BLE001  (nothing may return into the server's loop)
        _print_exception()
        os._exit(code)
    try:
        code = _run(request["args"])
    finally:
        os._exit(code)


def _become(request: dict, fds: list[int], server_fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in set(server_fds):
        os.close(fd)
    if request["new_session"]:
        os.setsid()
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _std_streams()
    _reseed()


def _std_streams() -> None:
    """The server's sys.stdin/stdout/stderr now read and write the child's fds 0-2 (same objects, as logging
    handlers made at import hold them); line-buffered on a terminal as the interpreter makes them; None for a
    closed fd."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        stream = getattr(sys, f"__{name}__")
        try:
            os.fstat(fd)
        except OSError:
            setattr(sys, name, None)
            continue
        if fd == 1 and os.isatty(1) and not stream.write_through:
            stream.reconfigure(line_buffering=True)
        setattr(sys, name, stream)


def _reseed() -> None:
    """A fresh interpreter seeds torch's and numpy's generators from the OS (PYTHONHASHSEED, fixed at the
    server's start, is the one thing all children share)."""
    sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(int.from_bytes(os.urandom(4), "little"))


def _run(args: list[str]) -> int:
    import runpy

    try:
        try:
            if args[0] == "-m":
                sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            elif args[0] == "-c":
                sys.argv, sys.path[0] = ["-c", *args[2:]], ""
                exec(compile(args[1], "<string>", "exec"), _fresh_main())
            else:
                sys.argv, sys.path[0] = list(args), str(Path(args[0]).resolve().parent)
                runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:
            _print_exception()
            return _die_by_sigint()
        except BaseException:  # noqa: BLE001
            _print_exception()
            code = 1
    finally:
        _finalize()
    return code


def _print_exception() -> None:
    """The traceback the interpreter prints, without this server's frames."""
    kind, error, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, str(HERE)):
        tb = tb.tb_next
    sys.excepthook(kind, error.with_traceback(tb), tb)


def _fresh_main() -> dict:
    import types

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    return main.__dict__


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finalize() -> None:
    """Python's exit: join non-daemon threads, atexit callbacks, flush the standard streams; an error in one
    of them is said ("Exception ignored") and changes no exit code."""
    steps = [threading._shutdown, atexit._run_exitfuncs]  # type: ignore[attr-defined]
    steps += [s.flush for s in (sys.stdout, sys.stderr) if s is not None]
    for step in steps:
        try:
            step()
        except BaseException as e:  # noqa: BLE001
            sys.unraisablehook(_Unraisable(type(e), e, e.__traceback__, "Exception ignored on exit", None))


class _Unraisable:  # what sys.unraisablehook takes
    def __init__(self, exc_type, exc_value, exc_traceback, err_msg, obj):
        self.exc_type, self.exc_value, self.exc_traceback = exc_type, exc_value, exc_traceback
        self.err_msg, self.object = err_msg, obj


def _die_by_sigint() -> int:
    _finalize()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    return 130


# ---- the client: subprocess.Popen, as the tests see it ----


class _Handle:
    """This pytest process's server, started on first use with the environment `workers.worker_env()` gave when
    the session began (the one most tests pass); only commands with that environment (but for the variables
    that may differ) fork from it. `forked` and `plain` count the commands each way."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.env: dict | None = None
        self.forked = self.plain = 0

    def path_for(self, env: dict) -> str | None:
        with self.lock:
            if self.env is None or env_key(env) != env_key(self.env):
                return None
            if self.proc is None:
                self._start(self.env)
            return os.path.join(self.dir, "server.sock")

    def _start(self, env: dict) -> None:
        self.dir = tempfile.mkdtemp(prefix="runner-zygote-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.path.join(self.dir, "server.sock"))
        listener.listen(64)
        with open(os.path.join(self.dir, "server.log"), "wb") as log:
            self.proc = _RealPopen([sys.executable, str(HERE), str(listener.fileno())], env=env, cwd=str(TESTS),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   pass_fds=[listener.fileno()], start_new_session=True)  # fmt: skip
        listener.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)


SERVER = _Handle()


def _forkable(args, env, cwd, shell, executable, preexec_fn, pass_fds, extra) -> bool:
    plain = shell or executable is not None or preexec_fn is not None or pass_fds
    if plain or any(
        extra.get(k) not in (None, -1, False) for k in ("uid", "gid", "gids", "umask", "process_group")
    ):
        return False
    if not isinstance(args, (list, tuple)) or len(args) < 3 or not all(isinstance(a, str) for a in args):
        return False
    if args[0] != sys.executable or not os.path.isdir(os.path.join(os.getcwd(), cwd or "")):
        return False
    env = os.environ if env is None else env
    # (a worker of `runner work --workers N`, RUNNER_LAUNCHER_PID, checks that its parent is that command)
    if env.get("RUNNER_TEST_EXEC") == "1" or "RUNNER_LAUNCHER_PID" in env:
        return False
    if not all(isinstance(x, str) for item in env.items() for x in item):
        return False
    if args[1] == "-m":
        return args[2] == "runner"
    if args[1] == "-c":  # what a test does at interpreter start (imports, their order) would not happen again
        return env.get("RUNNER_TEST_FORK") == "1"
    return args[1].endswith(".py") and Path(args[1]).resolve().parent == TESTS


class ZygotePopen(_RealPopen):
    _zygote_conn: socket.socket | None = None

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, *rest):  # fmt: skip
        extra = dict(
            zip(("gid", "gids", "uid", "umask", "start_new_session", "process_group"), rest, strict=False)
        )
        if not _forkable(args, env, cwd, shell, executable, preexec_fn, pass_fds, extra) or not self._fork(
            args, env, cwd, extra, (p2cread, c2pwrite, errwrite)
        ):
            SERVER.plain += 1
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, restore_signals, *rest)  # fmt: skip
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _fork(self, args, env, cwd, extra, fds) -> bool:
        env = dict(os.environ if env is None else env)
        path = SERVER.path_for(env)
        if path is None:
            return False
        request = {"args": list(args[1:]), "env": env, "cwd": os.path.join(os.getcwd(), cwd or ""),
                   "new_session": bool(extra.get("start_new_session"))}  # fmt: skip
        payload = json.dumps(request).encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            socket.send_fds(
                conn, [_HEADER.pack(len(payload))], [fd if fd != -1 else n for n, fd in enumerate(fds)]
            )
            conn.sendall(payload)
            self.pid = _HEADER.unpack(_recv_exactly(conn, _HEADER.size))[0]
        except OSError:
            conn.close()
            return False
        self._child_created = True
        self._zygote_conn = conn
        SERVER.forked += 1
        return True

    def _try_wait(self, wait_flags):
        if self._zygote_conn is None:
            return super()._try_wait(wait_flags)
        self._zygote_conn.setblocking(not (wait_flags & os.WNOHANG))
        try:
            data = _recv_exactly(self._zygote_conn, _HEADER.size)
        except BlockingIOError:
            return (0, 0)
        except OSError:  # the server died: the status is lost, but not before the child has ended
            if not _ended(self.pid, block=not (wait_flags & os.WNOHANG)):
                return (0, 0)
            data = _HEADER.pack(255 << 8)
        _reap(self._zygote_conn)
        self._zygote_conn.close()
        self._zygote_conn = None
        return (self.pid, _HEADER.unpack(data)[0])

    def _internal_poll(self, _deadstate=None, *args, **kw):
        if self._zygote_conn is None:
            return super()._internal_poll(_deadstate, *args, **kw)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None and self._zygote_conn is not None:
                    pid, sts = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(sts)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def _reap(conn: socket.socket) -> None:
    conn.setblocking(True)
    try:
        conn.sendall(b"r")
        conn.recv(1)
    except OSError:
        pass  # (the server is gone: so is the zombie)


def _ended(pid: int, block: bool) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], None if block else 0)[0])
    finally:
        os.close(fd)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            raise ConnectionError("the other end closed the connection")
        data += part
    return data


def install() -> None:
    """subprocess.Popen (and so subprocess.run) in this process goes through the fork servers."""
    if os.environ.get("RUNNER_TEST_ZYGOTE") == "0":
        return
    import workers

    SERVER.env = workers.worker_env()
    subprocess.Popen = ZygotePopen
    atexit.register(SERVER.stop)


if __name__ == "__main__":
    _preload()
    _Server(int(sys.argv[1])).serve()
