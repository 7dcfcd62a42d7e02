# sandgate's Python kernel for one code context (E2B's code interpreter).
#
# The server starts it inside the sandbox, as the sandbox user (a one-line
# loader reads this source as the first line of stdin), and speaks JSON lines
# with it: one request a line on stdin ({"code", "env"}), events on
# stdout: "ready" once, then per cell "start" (its execution count), "stdout" /
# "stderr" (text, batched), "result" (a MIME bundle; "main" for the value of
# the last expression, not for display()), "error" (name, value, traceback)
# and "end". Whatever the cell writes (print, warnings, subprocesses and C code
# writing to fds 1 and 2) is captured; nothing it does reaches the protocol's
# own file descriptors, which are private copies. SIGINT interrupts a running
# cell (KeyboardInterrupt, state kept) and is ignored between cells. State
# lives in a fresh __main__ module for the kernel's life.

import ast
import base64
import builtins
import codecs
import fcntl
import io
import json
import linecache
import os
import pprint
import queue
import select
import signal
import sys
import termios
import threading
import time
import traceback
import types

signal.signal(signal.SIGINT, signal.SIG_IGN)

# The protocol's ends, moved away from 0, 1 and 2 (os.dup makes them
# non-inheritable, so no subprocess of a cell holds them).
_requests = os.fdopen(os.dup(0), "rb")
_protocol = os.dup(1)
_diagnostics = os.dup(2)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)

# Events go out through one writer thread: a line is never cut by a
# KeyboardInterrupt (signal handlers run only in the main thread), and a slow
# reader holds the cell up instead of filling memory.
_outbox = queue.Queue(maxsize=256)


def _writer():
    while True:
        data = _outbox.get()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(_protocol, view):]
            except OSError:
                os._exit(0)  # the server is gone


threading.Thread(target=_writer, name="sandgate-protocol", daemon=True).start()


def _emit(msg):
    # Lone surrogates (from surrogateescape'd names) become "?" rather than
    # making the line invalid JSON.
    line = json.dumps(msg, ensure_ascii=False, default=repr) + "\n"
    _outbox.put(line.encode("utf-8", "replace"))


# ---- output ----------------------------------------------------------------

FLUSH_AFTER = 0.05  # seconds a write waits for more to join it
BATCH_LIMIT = 64 << 10  # characters per stdout/stderr event

_out_lock = threading.Condition()
_pending = {"kind": None, "parts": [], "size": 0, "since": 0.0}
_capturing = False  # output outside a cell is dropped


def _flush_locked():
    p = _pending
    if p["parts"]:
        _emit({"type": p["kind"], "text": "".join(p["parts"])})
    p["kind"], p["parts"], p["size"] = None, [], 0


def _write(kind, text):
    if not text:
        return
    with _out_lock:
        if not _capturing:
            return
        p = _pending
        if p["kind"] != kind:
            _flush_locked()
            p["kind"], p["since"] = kind, time.monotonic()
        while text:
            room = BATCH_LIMIT - p["size"]
            p["parts"].append(text[:room])
            p["size"] += len(text[:room])
            text = text[room:]
            if p["size"] >= BATCH_LIMIT:
                _flush_locked()
                p["kind"], p["since"] = kind, time.monotonic()
        _out_lock.notify()


def _flusher():
    with _out_lock:
        while True:
            if not _pending["parts"]:
                _out_lock.wait()
                continue
            due = _pending["since"] + FLUSH_AFTER - time.monotonic()
            if due > 0:
                _out_lock.wait(due)
                continue
            _flush_locked()


threading.Thread(target=_flusher, name="sandgate-flush", daemon=True).start()


class _Stream:
    """sys.stdout / sys.stderr of a cell."""

    encoding = "utf-8"
    errors = "strict"
    newlines = None
    closed = False

    def __init__(self, kind, fd):
        self.kind, self.fd, self.name = kind, fd, "<%s>" % kind
        self.buffer = os.fdopen(fd, "wb", buffering=0, closefd=False)

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        _write(self.kind, s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def fileno(self):
        return self.fd

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False


class _FdCapture:
    """What is written to fd 1 or 2 (subprocesses, C code), as that stream's text."""

    def __init__(self, fd, kind):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.fd, self.kind, self.busy = read_end, kind, False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        threading.Thread(target=self.pump, name="sandgate-" + kind, daemon=True).start()

    def pump(self):
        while True:
            try:
                select.select([self.fd], [], [])
                self.busy = True
                data = os.read(self.fd, 65536)
            except OSError:
                return
            _write(self.kind, self.decoder.decode(data))
            self.busy = False

    def pending(self):
        # Bytes still in the pipe, or read and not yet handed on (busy is set
        # before the read, so asking in this order misses nothing).
        size = bytearray(4)
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, size)
        except OSError:
            return False
        return int.from_bytes(size, sys.byteorder) > 0 or self.busy


_captures = [_FdCapture(1, "stdout"), _FdCapture(2, "stderr")]
sys.stdout = _Stream("stdout", 1)
sys.stderr = _Stream("stderr", 2)


def _drain():
    """Waits (briefly) for fd output written before the cell ended."""
    deadline = time.monotonic() + 0.25
    while time.monotonic() < deadline and any(c.pending() for c in _captures):
        time.sleep(0.002)


# ---- rich results ----------------------------------------------------------

_REPRS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
)
_BINARY = ("image/png", "image/jpeg", "application/pdf")


def _method(obj, name):
    # As IPython: no methods of classes, nor of objects that answer any name.
    if isinstance(obj, type):
        return None
    try:
        if getattr(obj, "_ipython_canary_method_should_not_exist_", None) is not None:
            return None
        method = getattr(obj, name, None)
    except Exception:
        return None
    return method if callable(method) else None


def _bundle(obj):
    """The MIME bundle of a value: its _repr_*_ methods, and text/plain."""
    data = {}
    method = _method(obj, "_repr_mimebundle_")
    if method is not None:
        try:
            got = method(include=None, exclude=None)
        except Exception:
            got = None
        if isinstance(got, tuple):
            got = got[0]
        if isinstance(got, dict):
            data.update((k, v) for k, v in got.items() if isinstance(k, str))
    for mime, name in _REPRS:
        method = None if mime in data else _method(obj, name)
        if method is None:
            continue
        try:
            value = method()
        except Exception:
            continue
        if isinstance(value, tuple):
            value = value[0]
        if value is not None:
            data[mime] = value
    for mime, value in list(data.items()):
        if isinstance(value, (bytes, bytearray)):
            if mime in _BINARY or not mime.startswith("text/"):
                data[mime] = base64.b64encode(value).decode("ascii")
            else:
                data[mime] = bytes(value).decode("utf-8", "replace")
        elif mime != "application/json" and not isinstance(value, str):
            del data[mime]
    if "text/plain" not in data:
        data["text/plain"] = pprint.pformat(obj, sort_dicts=False)
    return data


def _show(data, main):
    if main:
        _drain()
    with _out_lock:
        _flush_locked()  # what was printed before comes before
    _emit({"type": "result", "main": main, "data": data})


def _result(obj, main):
    _show(_bundle(obj), main)


def display(*objs, **_options):
    """Shows each object as a result of the cell (not its main result)."""
    for obj in objs:
        _result(obj, False)


# ---- matplotlib ------------------------------------------------------------
# Figures are shown as PNG results, by plt.show() and at the end of each cell,
# as Jupyter's inline backend does: matplotlib is pointed (unless the sandbox
# chose otherwise) at a backend module this kernel provides on import.

_BACKEND = "sandgate_inline"
os.environ.setdefault("MPLBACKEND", "module://" + _BACKEND)


def _show_figures(*_args, **_kwargs):
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None or plt.get_backend() != "module://" + _BACKEND:
        return
    for number in plt.get_fignums():
        figure = plt.figure(number)
        png = io.BytesIO()
        try:
            figure.savefig(png, format="png", bbox_inches="tight")
        except Exception as e:
            _write("stderr", "could not draw %r: %s\n" % (figure, e))
            continue
        data = {"image/png": base64.b64encode(png.getvalue()).decode("ascii"), "text/plain": repr(figure)}
        _show(data, False)
    plt.close("all")


class _BackendFinder:
    """Makes `import sandgate_inline` give matplotlib's Agg canvas and our show()."""

    def find_spec(self, name, path=None, target=None):
        if name != _BACKEND:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from matplotlib.backend_bases import FigureManagerBase
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        module.FigureCanvas = FigureCanvasAgg
        module.FigureManager = FigureManagerBase
        module.show = _show_figures


sys.meta_path.append(_BackendFinder())


# ---- cells -----------------------------------------------------------------

_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = __builtins__
_main.__dict__["display"] = display
sys.modules["__main__"] = _main
sys.argv = [""]
_count = 0
_loop = None
_TOP_LEVEL_AWAIT = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
_CO_COROUTINE = 0x80


def _evaluate(code):
    """Runs a compiled piece of a cell; awaits it when it awaits at top level."""
    result = eval(code, _main.__dict__)
    if code.co_flags & _CO_COROUTINE:
        global _loop
        import asyncio

        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
        task = _loop.create_task(result)
        try:
            result = _loop.run_until_complete(task)
        except BaseException:
            task.cancel()
            raise
    return result


def _shell(command):
    """A notebook's `!command`: run by the shell, its output the cell's."""
    import subprocess

    subprocess.run(command, shell=True)


def _magics(code):
    """A notebook's `!command`, `%pip …` and `%cd …` lines, as Python (line for
    line). Only asked for code that does not parse as it is."""
    lines = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("!"):
            line = "%s__sandgate_shell__(%r)" % (indent, stripped[1:])
        elif stripped.split(None, 1)[:1] == ["%pip"]:
            command = "%s -m pip%s" % (sys.executable, stripped[4:])
            line = "%s__sandgate_shell__(%r)" % (indent, command)
        elif stripped.split(None, 1)[:1] == ["%cd"]:
            line = "%s__import__('os').chdir(%r)" % (indent, os.path.expanduser(stripped[3:].strip() or "~"))
        lines.append(line)
    return "\n".join(lines)


builtins.__sandgate_shell__ = _shell


def _run(code, filename):
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
    except SyntaxError:
        rewritten = _magics(code)
        if rewritten == code:
            raise
        tree = ast.parse(rewritten, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    _evaluate(compile(tree, filename, "exec", flags=_TOP_LEVEL_AWAIT))
    if last is not None:
        value = _evaluate(compile(last, filename, "eval", flags=_TOP_LEVEL_AWAIT))
        if value is not None:
            _main.__dict__["_"] = value
            _result(value, True)
    _show_figures()


def _error_event(e):
    tb = e.__traceback__
    frames = []
    t = tb
    while t is not None:
        frames.append(t)
        t = t.tb_next
    cells = [f for f in frames if f.tb_frame.f_code.co_filename.startswith("<cell ")]
    if isinstance(e, SyntaxError) and not cells:
        tb = None
    elif cells:
        tb = cells[0]
    else:
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(e), e, tb))
        value = str(e)
    except Exception:
        text, value = type(e).__name__ + "\n", ""
    return {"type": "error", "name": type(e).__name__, "value": value, "traceback": text}


def _ignore_interrupts():
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def _set_env(env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore_env(saved):
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cell(request):
    global _count, _capturing
    _count += 1
    filename = "<cell %d>" % _count
    _emit({"type": "start", "execution_count": _count})
    saved = _set_env(request.get("env") or {})
    with _out_lock:
        _capturing = True
    failure = None
    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _run(request.get("code", ""), filename)
        except BaseException as e:  # SystemExit and KeyboardInterrupt included
            failure = e
        finally:
            _ignore_interrupts()
    except KeyboardInterrupt as e:  # arrived while the failure was noted
        failure = failure or e
    # From here on no KeyboardInterrupt can arrive.
    _drain()
    with _out_lock:
        _flush_locked()
        _capturing = False
    _restore_env(saved)
    if failure is not None:
        _emit(_error_event(failure))
    _emit({"type": "end"})


def _serve():
    _emit({"type": "ready", "pid": os.getpid()})
    for line in _requests:
        try:
            request = json.loads(line)
        except ValueError:
            os.write(_diagnostics, b"sandgate kernel: a request is not JSON\n")
            continue
        _cell(request)


_serve()
