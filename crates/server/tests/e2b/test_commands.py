"""commands.run in the foreground and in the background, through the real SDK."""

import asyncio
import time

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox, TimeoutException
from e2b.exceptions import InvalidArgumentException


def test_foreground_output_env_and_cwd(sandbox):
    r = sandbox.commands.run("echo hi $GREETING; pwd; echo oops >&2", envs={"GREETING": "there"})
    assert r.exit_code == 0
    assert r.stdout == "hi there\n/home/user\n"
    assert r.stderr == "oops\n"
    r = sandbox.commands.run("mkdir -p /tmp/work/sub && cd /tmp/work/sub && pwd")
    assert r.stdout.strip() == "/tmp/work/sub"
    r = sandbox.commands.run("pwd; touch here", cwd="/tmp/work")
    assert r.stdout.strip() == "/tmp/work"
    assert sandbox.commands.run("ls /tmp/work").stdout.split() == ["here", "sub"]


def test_a_missing_cwd_is_refused_before_anything_runs(sandbox):
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.commands.run("touch /tmp/ran", cwd="/no/such/dir")
    assert "/no/such/dir" in str(info.value)
    assert sandbox.commands.run("ls /tmp").stdout == ""


def test_sandbox_envs_reach_every_command():
    sbx = Sandbox.create(timeout=60, envs={"FROM_CREATE": "yes"})
    try:
        assert sbx.commands.run("echo $FROM_CREATE").stdout == "yes\n"
        assert sbx.commands.run("echo $FROM_CREATE", envs={"FROM_CREATE": "overridden"}).stdout == "overridden\n"
    finally:
        sbx.kill()


def test_callbacks_see_output_as_it_is_produced(sandbox):
    seen = []
    r = sandbox.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.3; done",
        on_stdout=lambda s: seen.append(("out", time.monotonic(), s)),
        on_stderr=lambda s: seen.append(("err", time.monotonic(), s)),
    )
    outs = [s for kind, _, s in seen if kind == "out"]
    errs = [s for kind, _, s in seen if kind == "err"]
    assert "".join(outs) == "out1\nout2\nout3\n" == r.stdout
    assert "".join(errs) == "err1\nerr2\nerr3\n" == r.stderr
    # Streamed, not delivered at the end: the first line came well before the last.
    times = [t for kind, t, _ in seen if kind == "out"]
    assert times[-1] - times[0] > 0.4


def test_non_zero_exit_raises_with_the_output(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; echo bad >&2; exit 7")
    e = info.value
    assert e.exit_code == 7
    assert e.stdout == "partial\n"
    assert e.stderr == "bad\n"


def test_a_timeout_ends_the_command(sandbox):
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30; echo never", timeout=2)
    assert time.monotonic() - started < 15
    # The command itself was killed at its deadline, not left running.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any("sleep 30" in " ".join(p.args) for p in sandbox.commands.list()):
            break
        time.sleep(0.2)
    assert not any("sleep 30" in " ".join(p.args) for p in sandbox.commands.list())


def test_background_wait_list_and_kill(sandbox):
    h = sandbox.commands.run("sleep 0.5; echo done-bg", background=True)
    assert h.pid > 0
    assert h.wait().stdout == "done-bg\n"

    long = sandbox.commands.run("sleep 60", background=True, envs={"TAGGED": "1"})
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert long.pid in listed
    p = listed[long.pid]
    assert p.cmd == "/bin/bash"
    assert p.args[-1] == "sleep 60"
    assert p.envs.get("TAGGED") == "1"
    assert long.kill() is True
    with pytest.raises(CommandExitException) as info:
        long.wait()
    assert info.value.exit_code != 0
    assert long.pid not in {p.pid for p in sandbox.commands.list()}
    assert sandbox.commands.kill(long.pid) is False


def test_files_and_background_processes_persist_between_commands(sandbox):
    sandbox.commands.run("echo kept > /home/user/state.txt")
    server = sandbox.commands.run(
        "python3 -m http.server 8123 --bind 127.0.0.1", background=True
    )
    try:
        assert sandbox.commands.run("cat state.txt").stdout == "kept\n"
        got = None
        for _ in range(50):
            try:
                got = sandbox.commands.run(
                    "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8123/').status)\""
                )
                break
            except CommandExitException:
                time.sleep(0.1)
        assert got is not None and got.stdout.strip() == "200"
    finally:
        server.kill()


def test_stdin_send_and_close(sandbox):
    h = sandbox.commands.run("read line; echo got:$line; cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello\n")
    h.send_stdin("more\n")
    sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "got:hello\nmore\n"


def test_stdin_streamed_in_order(sandbox):
    h = sandbox.commands.run("head -n 3", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, iter(["a\n", b"b\n", "c\n"]))
    assert h.wait().stdout == "a\nb\nc\n"


def test_connect_to_a_running_command(sandbox):
    h = sandbox.commands.run("sleep 1; echo late", background=True)
    again = sandbox.commands.connect(h.pid)
    assert again.wait().stdout == "late\n"


def test_async_client():
    async def main():
        sbx = await AsyncSandbox.create(timeout=60)
        try:
            out = []
            r = await sbx.commands.run("echo a; sleep 0.2; echo b", on_stdout=out.append)
            assert r.stdout == "a\nb\n"
            assert "".join(out) == "a\nb\n"
            h = await sbx.commands.run("sleep 30", background=True)
            assert h.pid in [p.pid for p in await sbx.commands.list()]
            assert await h.kill()
            with pytest.raises(CommandExitException):
                await sbx.commands.run("exit 2")
        finally:
            await sbx.kill()

    asyncio.run(main())
