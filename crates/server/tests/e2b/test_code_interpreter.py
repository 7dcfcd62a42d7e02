"""The code interpreter through the real e2b-code-interpreter SDK: run_code
with state kept, results and rich formats, errors, streaming callbacks, code
contexts, environment variables, timeouts, quotas and isolation — sync and
async clients."""

import asyncio
import json
import os
import threading
import time
import urllib.request

import httpx
import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox

from conftest import env

URL = env("SANDGATE_URL")


def admin(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + env("SANDGATE_ADMIN_KEY"))
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)


@pytest.fixture
def sbx():
    s = Sandbox.create(timeout=120)
    try:
        yield s
    finally:
        try:
            s.kill()
        except Exception:
            pass


def test_state_is_kept_between_cells(sbx):
    first = sbx.run_code("x = 1")
    assert first.error is None and first.results == [] and first.text is None
    second = sbx.run_code("x + 1")
    assert second.text == "2"
    assert second.execution_count == first.execution_count + 1
    sbx.run_code("import math\ndef area(r):\n    return math.pi * r * r")
    assert sbx.run_code("round(area(2), 3)").text == "12.566"
    # A string's text is the string, as E2B shows it.
    assert sbx.run_code("'hello'").text == "hello"
    # A trailing semicolon hides the value, as in a notebook.
    assert sbx.run_code("x + 1;").results == []


def test_logs_results_and_rich_formats(sbx):
    r = sbx.run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)\n[1, 2]")
    assert "".join(r.logs.stdout) == "out\n"
    assert "".join(r.logs.stderr) == "err\n"
    assert r.text == "[1, 2]"
    # Output of subprocesses is the cell's output too.
    r = sbx.run_code("import subprocess\nsubprocess.run('echo from-shell', shell=True)\nNone")
    assert "".join(r.logs.stdout) == "from-shell\n"
    # A notebook's shell escapes and %cd.
    r = sbx.run_code("!echo bang\n%cd /tmp\nimport os\nos.getcwd()")
    assert "".join(r.logs.stdout) == "bang\n" and r.text == "/tmp"
    r = sbx.run_code(
        "class Card:\n"
        "    def _repr_html_(self): return '<b>card</b>'\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "    def _repr_json_(self): return {'suit': 'hearts'}\n"
        "    def __repr__(self): return 'Card()'\n"
        "display(Card())\n"
        "Card()"
    )
    shown, main = r.results
    assert not shown.is_main_result and main.is_main_result
    for result in (shown, main):
        assert result.text == "Card()"
        assert result.html == "<b>card</b>"
        assert result.png == "iVBORw=="
        assert result.json == {"suit": "hearts"}
        assert set(result.formats()) == {"text", "html", "png", "json"}
    assert r.text == "Card()"


def test_an_exception_has_its_name_value_and_traceback(sbx):
    r = sbx.run_code("def f():\n    raise ValueError('bad value')\nprint('before')\nf()")
    assert r.error is not None
    assert r.error.name == "ValueError"
    assert r.error.value == "bad value"
    assert "Traceback" in r.error.traceback
    assert "raise ValueError('bad value')" in r.error.traceback
    assert "line 4" in r.error.traceback
    assert "sandgate" not in r.error.traceback
    assert r.logs.stdout == ["before\n"]
    syntax = sbx.run_code("x = (")
    assert syntax.error.name == "SyntaxError"
    # The context survives its errors.
    assert sbx.run_code("1 + 1").text == "2"


def test_callbacks_stream_output_before_the_cell_ends(sbx):
    seen = []
    r = sbx.run_code(
        "import sys, time\nprint('first')\nprint('oops', file=sys.stderr)\ntime.sleep(1.5)\nprint('second')\n42",
        on_stdout=lambda m: seen.append(("out", time.monotonic(), m.line)),
        on_stderr=lambda m: seen.append(("err", time.monotonic(), m.line)),
        on_result=lambda res: seen.append(("result", time.monotonic(), res.text)),
    )
    ended = time.monotonic()
    assert [(kind, text) for kind, _, text in seen] == [
        ("out", "first\n"),
        ("err", "oops\n"),
        ("out", "second\n"),
        ("result", "42"),
    ]
    # The first line arrived while the cell still slept.
    assert ended - seen[0][1] > 1.0
    assert r.text == "42"
    errors = []
    sbx.run_code("1/0", on_error=errors.append)
    assert [e.name for e in errors] == ["ZeroDivisionError"]


def test_contexts_are_independent_and_can_be_restarted_and_removed(sbx):
    defaults = sbx.list_code_contexts()
    assert sorted(c.language for c in defaults) == ["javascript", "python"]
    one = sbx.create_code_context()
    two = sbx.create_code_context(cwd="/tmp")
    assert one.id != two.id and one.language == "python" and two.cwd == "/tmp"
    sbx.run_code("x = 'default'")
    sbx.run_code("x = 'one'", context=one)
    sbx.run_code("x = 'two'", context=two)
    assert sbx.run_code("x").text == "default"
    assert sbx.run_code("x", context=one).text == "one"
    assert sbx.run_code("x", context=two).text == "two"
    assert sbx.run_code("import os; os.getcwd()", context=two).text == "/tmp"
    listed = {c.id for c in sbx.list_code_contexts()}
    assert {one.id, two.id} <= listed
    sbx.restart_code_context(one)
    assert sbx.run_code("x", context=one).error.name == "NameError"
    assert sbx.run_code("x", context=two).text == "two"
    sbx.remove_code_context(two.id)
    assert two.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sbx.run_code("x", context=two)
    with pytest.raises(NotFoundException):
        sbx.restart_code_context(two)
    with pytest.raises(SandboxException) as info:
        sbx.create_code_context(cwd="/no/such/dir")
    assert "400" in str(info.value)


def test_cells_of_a_context_run_one_at_a_time_in_turn(sbx):
    slow = threading.Thread(target=sbx.run_code, args=("import time\ntime.sleep(1)\norder = ['slow']",))
    slow.start()
    time.sleep(0.3)
    # Sent while the first runs: it waits for it, then sees what it did.
    r = sbx.run_code("order.append('next'); order")
    slow.join()
    assert r.text == "['slow', 'next']"


def test_javascript_keeps_state_too(sbx):
    assert sbx.run_code("let n = 20; n + 1", language="javascript").text == "21"
    r = sbx.run_code("console.log('hi'); n * 2", language="javascript")
    assert r.text == "40" and r.logs.stdout == ["hi\n"]
    assert sbx.run_code("const v = await Promise.resolve(5); v", language="js").text == "5"
    err = sbx.run_code("null.x", language="javascript").error
    assert err.name == "TypeError"
    js = sbx.create_code_context(language="javascript", cwd="/tmp")
    assert js.language == "javascript"
    assert sbx.run_code("process.cwd()", context=js).text == "/tmp"
    assert sbx.run_code("typeof n", context=js).text == "undefined"
    # Python's default context is another one.
    assert sbx.run_code("'n' in globals()").text == "False"


def test_envs_apply_to_one_cell(sbx):
    code = "import os; os.environ.get('GREETING', 'unset')"
    assert sbx.run_code(code, envs={"GREETING": "hello"}).text == "hello"
    assert sbx.run_code(code).text == "unset"
    js = "process.env.GREETING || 'unset'"
    assert sbx.run_code(js, language="javascript", envs={"GREETING": "hi"}).text == "hi"
    assert sbx.run_code(js, language="javascript").text == "unset"


def test_sandbox_envs_reach_the_interpreter():
    s = Sandbox.create(timeout=60, envs={"FROM_CREATE": "yes"})
    try:
        assert s.run_code("import os; os.environ['FROM_CREATE']").text == "yes"
    finally:
        s.kill()


def test_a_timeout_interrupts_the_cell_and_keeps_the_state(sbx):
    sbx.run_code("kept = 41")
    with pytest.raises(TimeoutException):
        sbx.run_code("while True: pass", timeout=1)
    r = sbx.run_code("kept + 1")
    assert r.text == "42"
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\ntime.sleep(60)", timeout=1)
    assert sbx.run_code("kept").text == "41"
    with pytest.raises(TimeoutException):
        sbx.run_code("while (true) {}", language="javascript", timeout=1)
    assert sbx.run_code("1 + 1", language="javascript").text == "2"


def test_a_dead_interpreter_is_replaced(sbx):
    sbx.run_code("x = 1")
    r = sbx.run_code("import os; os._exit(3)")
    assert r.error.name == "ContextRestarting"
    assert sbx.run_code("x").error.name == "NameError"
    assert sbx.run_code("2 + 2").text == "4"


def test_a_cell_that_ignores_interrupts_is_stopped_with_its_interpreter(sbx):
    sbx.run_code("x = 1")
    with pytest.raises(TimeoutException):
        sbx.run_code("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", timeout=1)
    # The next cell runs (in a new interpreter: the old one was killed).
    assert sbx.run_code("x").error.name == "NameError"
    assert sbx.run_code("'alive'").text == "alive"


def test_a_killed_sandbox_ends_the_cell():
    s = Sandbox.create(timeout=60)
    s.run_code("1")
    threading.Timer(1.0, s.kill).start()
    with pytest.raises(TimeoutException) as info:
        s.run_code("import time\ntime.sleep(30)")
    assert "killed" in str(info.value)


def test_the_async_client():
    async def main():
        s = await AsyncSandbox.create(timeout=60)
        try:
            await s.run_code("y = 10")
            seen = []

            async def on_stdout(m):
                seen.append(m.line)

            r = await s.run_code("print('async')\ny * 2", on_stdout=on_stdout)
            assert r.text == "20" and seen == ["async\n"]
            ctx = await s.create_code_context(cwd="/tmp")
            assert (await s.run_code("import os; os.getcwd()", context=ctx)).text == "/tmp"
            assert ctx.id in {c.id for c in await s.list_code_contexts()}
            await s.restart_code_context(ctx)
            await s.remove_code_context(ctx)
            assert ctx.id not in {c.id for c in await s.list_code_contexts()}
            with pytest.raises(TimeoutException):
                await s.run_code("while True: pass", timeout=1)
            assert (await s.run_code("y")).text == "10"
            assert (await s.run_code("[1].length", language="javascript")).text == "1"
        finally:
            await s.kill()

    asyncio.run(main())


def test_code_stays_in_the_sandbox(sbx):
    r = sbx.run_code("import os; os.getuid(), os.getgid()")
    assert r.text == "(65534, 65534)"
    r = sbx.run_code("open('/etc/shadow').read()")
    assert r.error.name in ("FileNotFoundError", "PermissionError")
    data_dir = env("SANDGATE_DATA_DIR")
    r = sbx.run_code(f"import os; os.path.exists({data_dir!r})")
    assert r.text == "False"
    r = sbx.run_code(f"require('fs').existsSync({json.dumps(data_dir)})", language="javascript")
    assert r.text == "false"


def test_the_interpreter_needs_the_sandboxs_token(sbx):
    other = Sandbox.create(timeout=60)
    try:
        for token in (None, "sat_wrong", other.traffic_access_token):
            headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
            if token:
                headers["E2B-Traffic-Access-Token"] = token
            r = httpx.post(URL + "/execute", headers=headers, json={"code": "1"})
            assert r.status_code == 401, r.text
            assert httpx.get(URL + "/contexts", headers=headers).status_code == 401
        headers = {
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": "49999",
            "E2B-Traffic-Access-Token": sbx.traffic_access_token,
        }
        health = httpx.get(URL + "/health", headers=headers)
        assert health.status_code == 200 and health.json() == "OK"
        both = httpx.post(URL + "/execute", headers=headers, json={"code": "1", "context_id": "c", "language": "python"})
        assert both.status_code == 400
    finally:
        other.kill()


def test_each_cell_is_an_execution_of_the_quota():
    key = env("SANDGATE_LIMITED_KEY")
    s = Sandbox.create(timeout=60, api_key=key)
    try:
        # Contexts cost nothing; cells one execution each.
        ctx = s.create_code_context()
        assert len(s.list_code_contexts()) == 3
        for i in range(3):
            assert s.run_code(f"n = {i}; n", context=ctx).text == str(i)
        with pytest.raises(SandboxException) as info:
            s.run_code("n = 99", context=ctx)
        assert "429" in str(info.value) and "QUOTA_EXCEEDED" in str(info.value)
        status, keys = admin("GET", "/v1/keys")
        limited = [k for k in keys["data"] if k["name"] == "limited"][0]
        assert limited["executionsRemaining"] == 0
        # The refused cell did not run.
        admin("POST", f"/v1/keys/{limited['id']}/reset-executions", {"remaining": 1})
        assert s.run_code("n", context=ctx).text == "2"
    finally:
        s.kill()


def test_a_key_without_execute_runs_no_code():
    s = Sandbox.create(timeout=60, api_key=env("SANDGATE_NO_EXECUTE_KEY"))
    try:
        with pytest.raises(SandboxException) as info:
            s.run_code("1")
        assert "sandbox:execute" in str(info.value)
    finally:
        s.kill()
