"""envd's wire protocol spoken directly (no SDK): Connect RPC with the JSON
codec over HTTP/1.1 and HTTP/2, envelopes, errors, keepalives, deadlines."""

import base64
import json
import struct
import time

import httpx
import pytest

from conftest import env

URL = env("SANDGATE_URL")


def envelope(msg, flags=0):
    data = json.dumps(msg).encode()
    return bytes([flags]) + struct.pack(">I", len(data)) + data


def read_envelopes(raw):
    out = []
    while raw:
        flags, length = raw[0], struct.unpack(">I", raw[1:5])[0]
        out.append((flags, json.loads(raw[5 : 5 + length])))
        raw = raw[5 + length :]
    return out


@pytest.fixture
def box():
    c = httpx.Client(base_url=URL, headers={"X-API-Key": env("E2B_API_KEY")})
    made = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}).json()
    headers = {"E2b-Sandbox-Id": made["sandboxID"], "X-Access-Token": made["envdAccessToken"]}
    yield headers
    c.delete("/sandboxes/" + made["sandboxID"])


def start(client, headers, cmd, extra_headers=None, **fields):
    msg = {"process": {"cmd": "/bin/bash", "args": ["-c", cmd]}, "stdin": False, **fields}
    h = {**headers, "Content-Type": "application/connect+json", **(extra_headers or {})}
    r = client.post(URL + "/process.Process/Start", headers=h, content=envelope(msg))
    assert r.headers["content-type"] == "application/connect+json"
    return read_envelopes(r.content)


def test_start_streams_over_http1_and_http2(box):
    for client in (httpx.Client(), httpx.Client(http1=False, http2=True)):
        events = start(client, box, "echo one; echo two >&2; exit 3")
        assert events[0][1]["event"]["start"]["pid"] > 0
        data = [e["event"]["data"] for _, e in events if "data" in e.get("event", {})]
        out = b"".join(base64.b64decode(d["stdout"]) for d in data if "stdout" in d)
        err = b"".join(base64.b64decode(d["stderr"]) for d in data if "stderr" in d)
        assert (out, err) == (b"one\n", b"two\n")
        end = events[-2][1]["event"]["end"]
        assert end["exitCode"] == 3 and end["exited"] is True and end["status"] == "exit status 3"
        assert events[-1] == (2, {})
    assert client.get(URL + "/health", headers=box).status_code == 204


def test_a_deadline_kills_the_whole_group_and_keepalives_fill_silence(box):
    client = httpx.Client(timeout=30)
    began = time.monotonic()
    events = start(
        client,
        box,
        "(sleep 60; echo child) & sleep 60",
        {"Connect-Timeout-Ms": "2500", "Keepalive-Ping-Interval": "1"},
    )
    assert time.monotonic() - began < 15
    kinds = [next(iter(e["event"])) for f, e in events if f == 0]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 1
    end = events[-2][1]["event"]["end"]
    assert end["exited"] is False and end["status"] == "signal: killed"
    listed = client.post(
        URL + "/process.Process/List", headers={**box, "Content-Type": "application/json"}, content=b"{}"
    ).json()
    assert listed == {"processes": []}
    # Nothing of the group is left: the backgrounded sleep died with it.
    r = start(client, box, "ps -eo args | grep -c '[s]leep 60' || true")
    out = b"".join(
        base64.b64decode(e["event"]["data"]["stdout"]) for _, e in r if "data" in e.get("event", {})
    )
    assert out.strip() == b"0"


def test_errors_are_connect_errors(box):
    client = httpx.Client()
    unary = {**box, "Content-Type": "application/json"}
    r = client.post(URL + "/process.Process/SendSignal", headers=unary,
                    content=json.dumps({"process": {"pid": 99999}, "signal": "SIGNAL_SIGKILL"}))
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    r = client.post(URL + "/process.Process/SendSignal", headers=unary,
                    content=json.dumps({"process": {"pid": 1}, "signal": "SIGNAL_SIGHUP"}))
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = client.post(URL + "/process.Process/Connect",
                    headers={**box, "Content-Type": "application/connect+json"},
                    content=envelope({"process": {"pid": 424242}}))
    [(flags, end)] = read_envelopes(r.content)
    assert flags == 2 and end["error"]["code"] == "not_found"
    # A cut envelope, an unknown codec, a pseudo-terminal: refused, nothing runs.
    r = client.post(URL + "/process.Process/Start",
                    headers={**box, "Content-Type": "application/connect+json"},
                    content=envelope({"process": {"cmd": "/bin/true"}})[:-3])
    assert read_envelopes(r.content)[0][1]["error"]["code"] == "invalid_argument"
    r = client.post(URL + "/process.Process/Start", headers={**box, "Content-Type": "application/connect+proto"},
                    content=b"\x00\x00\x00\x00\x00")
    assert read_envelopes(r.content)[0][1]["error"]["code"] == "invalid_argument"
    events = start(client, box, "true", pty={"size": {"cols": 80, "rows": 24}})
    assert events[0][1]["error"]["code"] == "unimplemented"


def test_tags_select_processes(box):
    client = httpx.Client(timeout=30)
    msg = {"process": {"cmd": "sleep", "args": ["30"]}, "tag": "my-server", "stdin": False}
    with client.stream("POST", URL + "/process.Process/Start",
                       headers={**box, "Content-Type": "application/connect+json"},
                       content=envelope(msg)) as stream:
        first = next(stream.iter_raw())
        pid = read_envelopes(first[: 5 + struct.unpack(">I", first[1:5])[0]])[0][1]["event"]["start"]["pid"]
    unary = {**box, "Content-Type": "application/json"}
    listed = client.post(URL + "/process.Process/List", headers=unary, content=b"{}").json()
    [proc] = listed["processes"]
    assert proc["pid"] == pid and proc["tag"] == "my-server"
    assert proc["config"]["cmd"] == "sleep" and proc["config"]["args"] == ["30"]
    r = client.post(URL + "/process.Process/SendSignal", headers=unary,
                    content=json.dumps({"process": {"tag": "my-server"}, "signal": "SIGNAL_SIGTERM"}))
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if client.post(URL + "/process.Process/List", headers=unary, content=b"{}").json()["processes"] == []:
            break
        time.sleep(0.1)
    assert client.post(URL + "/process.Process/List", headers=unary, content=b"{}").json()["processes"] == []


def test_a_refused_streaming_call_leaves_the_connection_usable(box):
    # A chunked body (as streaming RPC clients send) refused before it was
    # read: the client's next request on the same pooled connection works.
    client = httpx.Client(transport=httpx.HTTPTransport(retries=0))
    wrong = {**box, "X-Access-Token": "sat_wrong", "Content-Type": "application/connect+json"}

    def body():
        yield envelope({"process": {"cmd": "/bin/true"}})

    for _ in range(3):
        r = client.post(URL + "/process.Process/Start", headers=wrong, content=body())
        assert r.status_code == 401
        assert client.get(URL + "/health", headers=box).status_code == 204


def test_a_client_that_stops_reading_does_not_keep_a_command_past_its_deadline(box):
    import socket
    from urllib.parse import urlparse

    u = urlparse(URL)
    body = envelope({"process": {"cmd": "/usr/bin/yes", "args": ["flood"]}, "stdin": False})
    head = (
        f"POST /process.Process/Start HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"E2b-Sandbox-Id: {box['E2b-Sandbox-Id']}\r\nX-Access-Token: {box['X-Access-Token']}\r\n"
        f"Content-Type: application/connect+json\r\nConnect-Timeout-Ms: 1500\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stalled = socket.create_connection((u.hostname, u.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(head + body)  # and never read a byte of the answer
    try:
        time.sleep(4)
        client = httpx.Client(timeout=30)
        events = start(client, box, "ps -eo args | grep -c '^/usr/bin/yes' || true")
        out = b"".join(
            base64.b64decode(e["event"]["data"]["stdout"]) for _, e in events if "data" in e.get("event", {})
        )
        assert out.strip() == b"0", "the flood outlived its deadline"
    finally:
        stalled.close()
