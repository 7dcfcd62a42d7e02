# sandgate's persistent Python interpreter for one sandbox ("code contexts").
# Started on the first POST /v1/sandboxes/{id}/code by the client beside it; serves
# one cell at a time on a Unix socket; state lives in `ns` for the sandbox's life.
import ast, fcntl, io, json, os, signal, socket, sys, threading, traceback

SOCK = "/tmp/.sandgate/python.sock"
LOCK = "/tmp/.sandgate/python.lock"
ns = {"__name__": "__main__", "__builtins__": __builtins__}


def send(conn, msg):
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:
        pass


class Stream(io.TextIOBase):
    def __init__(self, conn, kind):
        self.conn, self.kind = conn, kind

    def writable(self):
        return True

    def write(self, s):
        if s:
            send(self.conn, {"type": self.kind, "data": s})
        return len(s)


def run_cell(conn, code):
    result, error = None, None
    out, err = Stream(conn, "stdout"), Stream(conn, "stderr")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), ns)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), ns)
            if value is not None:
                try:
                    result = json.loads(json.dumps(value))
                except (TypeError, ValueError):
                    result = repr(value)
    except BaseException as e:  # SystemExit and KeyboardInterrupt included
        error = type(e).__name__
        tb = e.__traceback__
        # Hide this file's own frames.
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb, file=err)
    finally:
        sys.stdout, sys.stderr = saved
    return result, error


def handle(conn):
    reader = conn.makefile("r")
    line = reader.readline()
    if not line:
        return
    code = json.loads(line)["code"]
    done = threading.Event()

    def watch():
        # The client went away (its deadline passed): interrupt the cell.
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    try:
        result, error = run_cell(conn, code)
        send(conn, {"type": "done", "result": result, "error": error})
    except KeyboardInterrupt:
        pass
    finally:
        done.set()


def main():
    os.makedirs(os.path.dirname(SOCK), exist_ok=True)
    lock = open(LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another kernel is already serving
    try:
        os.unlink(SOCK)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(SOCK)
    os.chmod(SOCK, 0o600)
    srv.listen(16)
    while True:
        try:
            conn, _ = srv.accept()
            with conn:
                handle(conn)
        except KeyboardInterrupt:
            continue


main()
