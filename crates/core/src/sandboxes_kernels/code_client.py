# Runs one cell in the sandbox's persistent interpreter of a language (argv[1]),
# starting it when needed: the cell's code on stdin; its output relayed as it
# comes; the value of a trailing expression written to fd 3 (the run's `result`).
# argv[2] is the cell's deadline in milliseconds (the JavaScript interpreter
# enforces it itself; the Python one is interrupted when this client is killed).
import json, os, socket, subprocess, sys, time

LANGUAGE = sys.argv[1]
TIMEOUT_MS = int(sys.argv[2])
SOCK = "/tmp/.sandgate/%s.sock" % LANGUAGE
KERNELS = {
    "python": [sys.executable, "-u", "-s", "-B", "/sandbox/.python-kernel.py"],
    "javascript": ["/usr/bin/node", "/sandbox/.javascript-kernel.js"],
}


def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    return s


code = sys.stdin.read()
try:
    conn = connect()
except OSError:
    subprocess.Popen(
        KERNELS[LANGUAGE],
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
        sys.stderr.write("sandgate: the %s interpreter did not start\n" % LANGUAGE)
        sys.exit(1)
# The interpreter stops the cell a little before this client's own deadline.
deadline = max(TIMEOUT_MS - 100, 1)
conn.sendall((json.dumps({"code": code, "timeoutMs": deadline}) + "\n").encode())
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
        if msg["error"] == "Timeout":
            # The interpreter stopped the cell at its deadline: let the run's own
            # deadline (moments away) end this client, so the run says `timeout`.
            time.sleep(5)
        sys.exit(1 if msg["error"] else 0)
sys.stderr.write("sandgate: the %s interpreter stopped\n" % LANGUAGE)
sys.exit(1)
