"""sandbox.files.* of the official SDK against sandgate's envd filesystem
surface: Connect RPC (Stat, ListDir, MakeDir, Move, Remove) and /files
(streamed, octet-stream and multipart, gzip), sync and async, and hostile
paths made inside a sandbox that must never reach a host file."""

import asyncio
import datetime
import gzip
import hashlib
import io
import os
import uuid

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import FileType

from conftest import env

URL = env("SANDGATE_URL")
LIMIT = int(env("SANDGATE_MAX_BODY_BYTES"))
DATA_DIR = env("SANDGATE_DATA_DIR")


def envd(sbx, method, path, **kwargs):
    """A raw request to the sandbox's envd, with its access token."""
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "X-Access-Token": sbx._envd_access_token,
        **kwargs.pop("headers", {}),
    }
    return httpx.request(method, URL + path, headers=headers, timeout=30, **kwargs)


def sh(sbx, script):
    return sbx.commands.run(script).stdout


class HostFile:
    """A host file no sandbox may read or change."""

    def __init__(self):
        self.path = f"/tmp/sandgate-e2bfs-{uuid.uuid4().hex}"
        with open(self.path, "w") as f:
            f.write("host secret")

    def untouched(self):
        with open(self.path) as f:
            assert f.read() == "host secret"


@pytest.fixture
def host_file():
    h = HostFile()
    yield h
    h.untouched()
    os.remove(h.path)


def test_text_and_bytes_round_trip(sandbox):
    info = sandbox.files.write("/home/user/notes/hello.txt", "héllo ☃\n")
    assert (info.name, info.path, info.type) == ("hello.txt", "/home/user/notes/hello.txt", FileType.FILE)
    assert sandbox.files.read("/home/user/notes/hello.txt") == "héllo ☃\n"
    # Relative paths and ~ start at the home, which programs see too.
    assert sandbox.files.read("notes/hello.txt") == "héllo ☃\n"
    assert sandbox.files.read("~/notes/hello.txt") == "héllo ☃\n"
    assert sh(sandbox, "cat /home/user/notes/hello.txt; stat -c %U:%a notes/hello.txt") == "héllo ☃\n" + "sandbox:644\n"

    every_byte = bytes(range(256)) * 64
    sandbox.files.write("bin/all.bin", every_byte)
    got = sandbox.files.read("bin/all.bin", format="bytes")
    assert isinstance(got, bytearray) and bytes(got) == every_byte
    sandbox.files.write("bin/all.bin", b"shorter")
    assert sandbox.files.read("bin/all.bin", format="bytes") == b"shorter", "overwritten, not appended"
    sandbox.files.write("empty", b"")
    assert sandbox.files.read("empty") == ""

    # What a command writes, the SDK reads, and back.
    sandbox.commands.run("printf 'from a command' > /tmp/cmd.txt")
    assert sandbox.files.read("/tmp/cmd.txt") == "from a command"
    sandbox.files.write("/tmp/../tmp/./x.txt", io.StringIO("text file-like"))
    assert sh(sandbox, "cat /tmp/x.txt") == "text file-like"


def test_a_large_file_streams_both_ways(sandbox):
    data = os.urandom(20 << 20)
    digest = hashlib.sha256(data).hexdigest()
    # A file-like object goes as a streamed octet-stream body.
    sandbox.files.write("big/one.bin", io.BytesIO(data))
    assert sh(sandbox, "sha256sum big/one.bin").split()[0] == digest
    chunks = list(sandbox.files.read("big/one.bin", format="stream"))
    assert len(chunks) > 1, "streamed in pieces"
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == digest
    assert hashlib.sha256(sandbox.files.read("big/one.bin", format="bytes")).hexdigest() == digest
    # An iterable of chunks (chunked body), and a multipart form.
    sandbox.files.write("big/two.bin", (data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)))
    sandbox.files.write("big/three.bin", data, use_octet_stream=False)
    assert sh(sandbox, "sha256sum big/two.bin big/three.bin | cut -c1-64 | uniq") == digest + "\n"


def test_write_files_writes_several_at_once(sandbox):
    written = sandbox.files.write_files(
        [
            {"path": "/home/user/many/a.txt", "data": "A"},
            {"path": "many/deep/b.bin", "data": b"B" * 1000},
            {"path": "/tmp/c.txt", "data": "C"},
        ]
    )
    assert [w.path for w in written] == [
        "/home/user/many/a.txt",
        "/home/user/many/deep/b.bin",
        "/tmp/c.txt",
    ]
    assert [w.name for w in written] == ["a.txt", "b.bin", "c.txt"]
    assert sh(sandbox, "cat many/a.txt /tmp/c.txt; wc -c < many/deep/b.bin") == "AC1000\n"
    # Octet-stream: one request a file.
    again = sandbox.files.write_files(
        [{"path": "one", "data": io.BytesIO(b"1")}, {"path": "two", "data": io.BytesIO(b"2")}]
    )
    assert [w.path for w in again] == ["/home/user/one", "/home/user/two"]
    assert sandbox.files.write_files([]) == []
    # Two parts for one path are refused, as envd refuses them.
    r = envd(
        sandbox,
        "POST",
        "/files",
        files=[("file", ("/home/user/dup", b"1")), ("file", ("/home/user/dup", b"2"))],
    )
    assert r.status_code == 400 and "same path" in r.json()["message"]


def test_exists_and_get_info(sandbox):
    sandbox.files.write("info/f.txt", "12345")
    assert sandbox.files.exists("info/f.txt") is True
    assert sandbox.files.exists("/home/user/info") is True
    assert sandbox.files.exists("info/missing") is False
    f = sandbox.files.get_info("info/f.txt")
    assert (f.name, f.type, f.path, f.size) == ("f.txt", FileType.FILE, "/home/user/info/f.txt", 5)
    assert (f.mode, f.permissions, f.owner, f.group) == (0o644, "-rw-r--r--", "user", "user")
    age = datetime.datetime.now(datetime.timezone.utc) - f.modified_time
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)
    assert f.symlink_target is None
    d = sandbox.files.get_info("/home/user/info")
    assert (d.name, d.type, d.permissions) == ("info", FileType.DIR, "drwxr-xr-x")
    t = sandbox.files.get_info("/tmp")
    assert t.permissions == "dtrwxrwxrwx" and t.mode == 0o777
    home = sandbox.files.get_info("/home/user")
    assert (home.type, home.symlink_target) == (FileType.SYMLINK, "/workspace")


def test_errors_are_the_sdks_exceptions(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info("missing")
    with pytest.raises(FileNotFoundException):
        sandbox.files.list("/home/user/missing")
    sandbox.files.write("plain", "x")
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.files.list("plain")
    assert "not a directory" in str(info.value)
    with pytest.raises(InvalidArgumentException) as info:
        sandbox.files.read("/home/user")
    assert "is a directory" in str(info.value)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("~root/x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/etc/motd", "read-only")
    # envd's two users are both the sandbox user; no other exists.
    assert sandbox.files.read("plain", user="root") == "x"
    assert sandbox.files.get_info("plain", user="user").owner == "user"
    with pytest.raises(AuthenticationException):
        sandbox.files.get_info("plain", user="admin")
    with pytest.raises(AuthenticationException):
        sandbox.files.read("plain", user="admin")


def test_make_dir_rename_and_remove(sandbox):
    assert sandbox.files.make_dir("/home/user/m/n/o") is True
    assert sandbox.files.make_dir("/home/user/m/n/o") is False
    assert sandbox.files.make_dir("m") is False
    sandbox.files.write("m/file", "f")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir("m/file")
    assert sh(sandbox, "stat -c %U m/n/o") == "sandbox\n"

    moved = sandbox.files.rename("m/file", "/home/user/elsewhere/renamed")
    assert (moved.name, moved.path, moved.type) == ("renamed", "/home/user/elsewhere/renamed", FileType.FILE)
    assert sandbox.files.exists("m/file") is False
    assert sandbox.files.read("elsewhere/renamed") == "f"
    d = sandbox.files.rename("/home/user/m", "/home/user/m2")
    assert (d.path, d.type) == ("/home/user/m2", FileType.DIR)
    assert sandbox.files.exists("m2/n/o")
    # /tmp and /workspace are two filesystems: a file is copied across.
    sandbox.files.write("/tmp/across", "over")
    assert sandbox.files.rename("/tmp/across", "across").size == 4
    assert sandbox.files.read("across") == "over"
    assert not sandbox.files.exists("/tmp/across")
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename("nothing-here", "x")

    sandbox.files.remove("across")
    assert not sandbox.files.exists("across")
    sandbox.files.remove("/home/user/m2")
    assert not sandbox.files.exists("m2")
    sandbox.files.remove("/home/user/never-was")  # like rm -rf: not an error
    with pytest.raises(SandboxException):
        sandbox.files.remove("/usr/bin")


def test_list_to_a_depth(sandbox):
    sh(sandbox, "mkdir -p t/a/b/c && echo 1 > t/a/one && echo 2 > t/a/b/two && echo 3 > t/top && ln -s a t/link")
    names = lambda entries: [(e.path.removeprefix("/home/user/t/"), e.type) for e in entries]
    assert names(sandbox.files.list("t")) == [
        ("a", FileType.DIR),
        ("link", FileType.SYMLINK),
        ("top", FileType.FILE),
    ]
    assert names(sandbox.files.list("/home/user/t", depth=2)) == [
        ("a", FileType.DIR),
        ("a/b", FileType.DIR),
        ("a/one", FileType.FILE),
        ("link", FileType.SYMLINK),
        ("top", FileType.FILE),
    ]
    deep = names(sandbox.files.list("t", depth=10))
    assert ("a/b/c", FileType.DIR) in deep and ("a/b/two", FileType.FILE) in deep
    assert not any(p.startswith("link/") for p, _ in deep), "links are not followed"
    link = [e for e in sandbox.files.list("t") if e.name == "link"][0]
    assert link.symlink_target == "/workspace/t/a"
    top = [e for e in sandbox.files.list("t") if e.name == "top"][0]
    assert (top.size, top.owner, top.permissions) == (2, "user", "-rw-r--r--")
    # A link to a directory lists the directory, under the link's path.
    assert names(sandbox.files.list("t/link")) == [("link/b", FileType.DIR), ("link/one", FileType.FILE)]


def test_gzip_both_ways(sandbox):
    text = "compressible " * 10_000
    sandbox.files.write("gz.txt", text, gzip=True)
    assert sh(sandbox, "wc -c < gz.txt") == f"{len(text)}\n"
    assert sandbox.files.read("gz.txt", gzip=True) == text
    r = envd(sandbox, "GET", "/files", params={"path": "gz.txt"}, headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert r.num_bytes_downloaded < len(text)
    assert r.text == text
    r = envd(sandbox, "GET", "/files", params={"path": "gz.txt"}, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in r.headers and r.headers["content-length"] == str(len(text))
    r = envd(
        sandbox,
        "POST",
        "/files",
        params={"path": "raw.gz.txt"},
        content=gzip.compress(b"raw gzip"),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"path": "/home/user/raw.gz.txt", "name": "raw.gz.txt", "type": "file"}]
    assert sandbox.files.read("raw.gz.txt") == "raw gzip"
    r = envd(
        sandbox,
        "POST",
        "/files",
        params={"path": "bad"},
        content=b"not gzip at all",
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 400
    assert not sandbox.files.exists("bad")


def test_the_body_limit_and_a_full_disk(sandbox):
    sandbox.files.write("kept", "previous")
    too_big = b"x" * (LIMIT + 1)
    for data in (too_big, io.BytesIO(too_big), (too_big[i : i + 65536] for i in range(0, len(too_big), 65536))):
        with pytest.raises(SandboxException) as info:
            sandbox.files.write("kept", data)
        assert "413" in str(info.value) and "limit" in str(info.value)
    assert sandbox.files.read("kept") == "previous", "a refused upload changes nothing"
    assert sh(sandbox, "ls -A /home/user") == "kept\n", "and leaves no temporary file"
    # A decompressed body is held to the same limit.
    bomb = gzip.compress(b"\0" * (LIMIT + 1))
    with pytest.raises(SandboxException) as info:
        sandbox.files.write("bomb", io.BytesIO(b"\0" * (LIMIT + 1)), gzip=True)
    assert "413" in str(info.value)
    r = envd(
        sandbox,
        "POST",
        "/files",
        params={"path": "bomb"},
        content=bomb,
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413 and r.json()["code"] == 413
    assert not sandbox.files.exists("bomb")
    # The sandbox's /tmp is full: envd's 507.
    sh(sandbox, "head -c $(( $(df -B1 --output=avail /tmp | tail -1) - 4096 )) /dev/zero > /tmp/fill || true")
    with pytest.raises(NotEnoughSpaceException):
        sandbox.files.write("/tmp/more", os.urandom(1 << 20))
    assert not sandbox.files.exists("/tmp/more")


def test_the_async_client(sandbox):
    async def main():
        sbx = await AsyncSandbox.connect(sandbox.sandbox_id)
        w = await sbx.files.write("/home/user/async/a.txt", "async text")
        assert w.path == "/home/user/async/a.txt"
        assert await sbx.files.read("async/a.txt") == "async text"
        await sbx.files.write("async/b.bin", b"\x00\x01\x02")
        assert await sbx.files.read("async/b.bin", format="bytes") == b"\x00\x01\x02"
        data = os.urandom(3 << 20)
        await sbx.files.write("async/big", io.BytesIO(data))
        stream = await sbx.files.read("async/big", format="stream")
        got = b"".join([chunk async for chunk in stream])
        assert got == data
        many = await sbx.files.write_files(
            [{"path": "async/c", "data": "c"}, {"path": "async/d", "data": b"d"}]
        )
        assert [m.name for m in many] == ["c", "d"]
        assert await sbx.files.exists("async/c") is True
        assert await sbx.files.exists("async/zzz") is False
        info = await sbx.files.get_info("async/big")
        assert (info.type, info.size) == (FileType.FILE, 3 << 20)
        assert await sbx.files.make_dir("async/sub/dir") is True
        assert await sbx.files.make_dir("async/sub/dir") is False
        listed = await sbx.files.list("async", depth=2)
        assert [e.name for e in listed] == ["a.txt", "b.bin", "big", "c", "d", "sub", "dir"]
        moved = await sbx.files.rename("async/c", "async/sub/c")
        assert moved.path == "/home/user/async/sub/c"
        await sbx.files.remove("async/sub")
        assert await sbx.files.exists("async/sub/c") is False
        with pytest.raises(FileNotFoundException):
            await sbx.files.read("async/sub/c")

    asyncio.run(main())


def test_hostile_links_never_reach_the_host(sandbox, host_file):
    h = host_file.path
    before = sorted(os.listdir(DATA_DIR))
    sh(
        sandbox,
        f"ln -s {h} abs; ln -s ../../../../../../..{h} rel; ln -s abs chain; ln -s / root; "
        f"ln -s /etc/shadow shadow; ln -s {DATA_DIR} data; ln -s {DATA_DIR}/sandgate.db db; "
        "ln -s /proc/1/root proc; mkdir dir; ln -s / dir/up",
    )
    for link in ("abs", "rel", "chain", "shadow", "data", "db", f"root{h}", f"dir/up{h}", f"../../..{h}"):
        with pytest.raises(FileNotFoundException):
            sandbox.files.read(link)
    for link, target in (("abs", h), ("shadow", "/etc/shadow"), ("data", DATA_DIR), ("db", f"{DATA_DIR}/sandgate.db")):
        info = sandbox.files.get_info(link)
        assert (info.type, info.symlink_target, info.mode) == (FileType.SYMLINK, target, 0), link
        assert info.size == len(target), "the link's own size, nothing of its target"
    assert sandbox.files.get_info("root").symlink_target == "/"
    with pytest.raises(FileNotFoundException):
        sandbox.files.list("data")
    # The sandbox's own /etc/passwd, not the host's.
    assert "sandbox:x:65534" in sandbox.files.read("../../../../../etc/passwd")
    r = envd(sandbox, "GET", "/files", params={"path": "root/etc/passwd"})
    assert r.status_code == 200 and "sandbox:x:65534" in r.text
    # A listing through a link to / is the sandbox's root, and a deep listing
    # never goes through links, nor into /proc.
    marker = f"/sandgate-e2bfs-{uuid.uuid4().hex}"
    os.mkdir(marker)
    try:
        top = {e.name for e in sandbox.files.list("root")}
    finally:
        os.rmdir(marker)
    assert {"workspace", "usr", "tmp", "proc"} <= top
    assert marker[1:] not in top, "the host's root is never listed"
    deep = sandbox.files.list("/home/user", depth=4)
    assert all("/root/" not in e.path and "/up/" not in e.path for e in deep)
    assert [e.type for e in deep if e.name == "up"] == [FileType.SYMLINK]
    listed = sandbox.files.list("/", depth=2)
    assert any(e.path == "/proc" for e in listed)
    assert not any(e.path.startswith("/proc/") for e in listed)
    for call in (
        lambda: sandbox.files.read("/proc/1/environ"),
        lambda: sandbox.files.read("/proc/self/root/etc/hostname"),
        lambda: sandbox.files.list("/proc"),
        lambda: sandbox.files.list("proc"),
        lambda: sandbox.files.get_info("/proc/1/root/etc"),
        lambda: sandbox.files.list("/sys"),
    ):
        with pytest.raises(SandboxException):
            call()

    # Writing "through" a link replaces the link; parents through links stay inside.
    sandbox.files.write("abs", "pwned")
    assert sandbox.files.get_info("abs").type == FileType.FILE
    sandbox.files.write(f"root{h}", "inside")
    assert sh(sandbox, f"cat {h}") == "inside"
    with pytest.raises(SandboxException):
        sandbox.files.write("data/evil", "x")
    with pytest.raises(SandboxException):
        sandbox.files.write("dir/up/etc/passwd", "x")
    # Renames onto and through links.
    sandbox.files.write("mover", "m")
    sandbox.files.rename("mover", "chain")
    assert sandbox.files.get_info("chain").type == FileType.FILE
    sandbox.files.rename("chain", "dir/up/tmp/through")
    assert sh(sandbox, "cat /tmp/through") == "m"
    sandbox.files.rename("rel", f"root/../../..{h}")
    assert sandbox.files.get_info(f"/tmp/{os.path.basename(h)}").type == FileType.SYMLINK
    with pytest.raises(SandboxException):
        sandbox.files.rename("shadow", "root/etc/shadow")
    assert sandbox.files.make_dir(f"dir/up{h}.d") is True
    assert not os.path.exists(h + ".d")
    # Removing links leaves their targets.
    for link in ("data", "db", "root", "dir"):
        sandbox.files.remove(link)
    assert set(before) - {"sandgate.db-shm", "sandgate.db-wal"} <= set(os.listdir(DATA_DIR))
    assert not os.path.exists(os.path.join(DATA_DIR, "evil"))
    assert sandbox.files.exists("/usr/bin/env")

    # Raw requests: a multipart filename with `..` stays inside too.
    name = f"evil-{uuid.uuid4().hex}"
    r = envd(sandbox, "POST", "/files", files=[("file", (f"../../../../../tmp/{name}", b"e"))])
    assert r.status_code == 200 and r.json()[0]["path"] == f"/tmp/{name}"
    assert not os.path.exists(f"/tmp/{name}")
    assert sh(sandbox, f"cat /tmp/{name}") == "e"
    r = envd(sandbox, "POST", "/files", params={"path": "/etc/passwd"}, content=b"x",
             headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "read-only" in r.json()["message"]


def test_the_sandbox_users_rights_apply_whoever_is_named(sandbox):
    sh(sandbox, "echo private > p; chmod 000 p; mkdir closed; echo in > closed/f; chmod 000 closed")
    for user in (None, "user", "root"):
        with pytest.raises(InvalidArgumentException) as info:
            sandbox.files.read("p", user=user)
        assert "permission denied" in str(info.value)
        with pytest.raises(SandboxException):
            sandbox.files.list("closed", user=user)
        with pytest.raises(SandboxException):
            sandbox.files.write("closed/new", "x", user=user)
    sh(sandbox, "chmod 755 closed")
    assert sandbox.files.read("closed/f", user="root") == "in\n"


def test_envd_files_need_the_token_and_the_owners_files_scope(sandbox):
    r = httpx.get(URL + "/files", params={"path": "x"}, headers={"E2b-Sandbox-Id": sandbox.sandbox_id})
    assert r.status_code == 401
    r = httpx.get(
        URL + "/files",
        params={"path": "x"},
        headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": "wrong"},
    )
    assert r.status_code == 401
    r = httpx.post(
        URL + "/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={"E2b-Sandbox-Id": sandbox.sandbox_id},
    )
    assert r.status_code == 401
    sbx = Sandbox.create(timeout=60, api_key=env("SANDGATE_NO_FILES_KEY"))
    try:
        assert sbx.commands.run("echo runs").stdout == "runs\n"
        for call in (
            lambda: sbx.files.read("/etc/hostname"),
            lambda: sbx.files.write("x", "x"),
            lambda: sbx.files.list("/"),
            lambda: sbx.files.exists("/"),
        ):
            with pytest.raises(SandboxException) as info:
                call()
            assert "sandbox:files" in str(info.value)
    finally:
        sbx.kill()
