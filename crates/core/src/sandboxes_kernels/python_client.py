# Runs one cell in the sandbox's persistent Python interpreter, starting it when
# needed: the cell's code on stdin; its output relayed as it comes; the value of
# a trailing expression written to fd 3 (the run's `result`).
import json, os, socket, subprocess, sys, time

SOCK = "/tmp/.sandgate/python.sock"


def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    return s


code = sys.stdin.read()
try:
    conn = connect()
except OSError:
    subprocess.Popen(
        [sys.executable, "-u", "-s", "-B", "/sandbox/.python-kernel.py"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/workspace",
    )
    for _ in range(500):
        time.sleep(0.01)
        try:
            conn = connect()
            break
        except OSError:
            pass
    else:
        sys.stderr.write("sandgate: the Python interpreter did not start\n")
        sys.exit(1)
conn.sendall((json.dumps({"code": code}) + "\n").encode())
for line in conn.makefile("r"):
    msg = json.loads(line)
    kind = msg["type"]
    if kind == "stdout":
        sys.stdout.write(msg["data"])
        sys.stdout.flush()
    elif kind == "stderr":
        sys.stderr.write(msg["data"])
        sys.stderr.flush()
    elif kind == "done":
        if msg["result"] is not None:
            try:
                os.write(3, json.dumps(msg["result"]).encode())
            except OSError:
                pass
        sys.exit(1 if msg["error"] else 0)
sys.stderr.write("sandgate: the Python interpreter stopped\n")
sys.exit(1)
