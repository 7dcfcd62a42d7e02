"""Sandbox lifecycle through the control plane: create, list, connect, timeout,
pause and resume, kill — sync and async clients."""

import asyncio
import datetime
import time
import uuid

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException


def test_create_with_timeout_metadata_and_envs():
    run = uuid.uuid4().hex
    sbx = Sandbox.create(timeout=90, metadata={"run": run, "role": "worker"}, envs={"A": "1"})
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata == {"run": run, "role": "worker"}
        assert info.state == SandboxState.RUNNING
        life = (info.end_at - info.started_at).total_seconds()
        assert 85 <= life <= 95
        assert sbx.is_running()
        assert sbx.commands.run("echo $A").stdout == "1\n"
    finally:
        sbx.kill()
    assert not sbx.is_running()


def test_list_filters_and_pages():
    run = uuid.uuid4().hex
    made = [Sandbox.create(timeout=60, metadata={"run": run, "n": str(i)}) for i in range(3)]
    other = Sandbox.create(timeout=60, metadata={"run": "someone-else"})
    try:
        ids = {s.sandbox_id for s in made}
        found = Sandbox.list(query=SandboxQuery(metadata={"run": run})).next_items()
        assert {s.sandbox_id for s in found} == ids
        one = Sandbox.list(query=SandboxQuery(metadata={"run": run, "n": "1"})).next_items()
        assert [s.sandbox_id for s in one] == [made[1].sandbox_id]

        pages = Sandbox.list(query=SandboxQuery(metadata={"run": run}), limit=2)
        seen = []
        while pages.has_next:
            page = pages.next_items()
            assert len(page) <= 2
            seen.extend(s.sandbox_id for s in page)
        assert sorted(seen) == sorted(ids)

        made[0].pause()
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED])
        ).next_items()
        assert [s.sandbox_id for s in paused] == [made[0].sandbox_id]
        running = Sandbox.list(
            query=SandboxQuery(metadata={"run": run}, state=[SandboxState.RUNNING])
        ).next_items()
        assert {s.sandbox_id for s in running} == ids - {made[0].sandbox_id}
    finally:
        for s in made + [other]:
            s.kill()
    assert Sandbox.list(query=SandboxQuery(metadata={"run": run})).next_items() == []


def test_connect_set_timeout_pause_and_resume():
    sbx = Sandbox.create(timeout=60)
    try:
        sbx.commands.run("echo before > /home/user/f")
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.sandbox_id == sbx.sandbox_id
        assert again.commands.run("cat f").stdout == "before\n"

        sbx.set_timeout(200)
        life = (sbx.get_info().end_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        assert 190 <= life <= 205

        counter = sbx.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done",
            background=True,
        )
        time.sleep(0.5)
        assert sbx.pause() is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        frozen = open_count(sbx)
        time.sleep(0.6)
        assert open_count(sbx) == frozen, "a paused sandbox does not run"
        # Pausing twice is refused by the server and reported as "already paused".
        assert sbx.pause() is False

        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.get_info().state == SandboxState.RUNNING
        time.sleep(0.5)
        assert int(resumed.commands.run("cat /tmp/count").stdout) > frozen
        counter.kill()
        assert resumed.commands.run("cat f").stdout == "before\n"
    finally:
        sbx.kill()


def open_count(sbx):
    # Files are read from the host side (no command runs in a frozen sandbox).
    return int(sbx.files.read("/tmp/count"))


def test_kill_and_unknown_ids():
    sbx = Sandbox.create(timeout=60)
    assert Sandbox.kill(sbx.sandbox_id) is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxException):
        Sandbox.connect(sbx.sandbox_id)
    with pytest.raises(SandboxException):
        Sandbox.get_info("sbx_doesnotexist0000000")


def test_expiry_kills_the_sandbox():
    sbx = Sandbox.create(timeout=2)
    assert sbx.is_running()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sbx.is_running():
        time.sleep(0.3)
    assert not sbx.is_running()


def test_async_lifecycle():
    async def main():
        run = uuid.uuid4().hex
        sbx = await AsyncSandbox.create(timeout=60, metadata={"run": run})
        try:
            assert (await sbx.get_info()).metadata == {"run": run}
            page = await AsyncSandbox.list(query=SandboxQuery(metadata={"run": run})).next_items()
            assert [s.sandbox_id for s in page] == [sbx.sandbox_id]
            await sbx.set_timeout(100)
            assert await sbx.pause()
            again = await AsyncSandbox.connect(sbx.sandbox_id)
            assert (await again.get_info()).state == SandboxState.RUNNING
            assert (await again.commands.run("echo async")).stdout == "async\n"
        finally:
            await sbx.kill()
        assert not await sbx.is_running()

    asyncio.run(main())
