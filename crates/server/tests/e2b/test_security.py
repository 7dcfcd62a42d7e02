"""The SDK is held to sandgate's rules: tenants and envs, tokens, scopes,
quotas, revocation and audit apply to E2B's routes as to /v1."""

import json
import os
import urllib.request

import httpx
import pytest
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import (
    AuthenticationException,
    RateLimitException,
    SandboxException,
)

from conftest import env

URL = env("SANDGATE_URL")


def admin(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + env("SANDGATE_ADMIN_KEY"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def envd(sandbox_id, token, path="/process.Process/List", body=b"{}"):
    headers = {"E2b-Sandbox-Id": sandbox_id, "Content-Type": "application/json"}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.post(URL + path, headers=headers, content=body)


def test_other_tenants_and_envs_see_nothing(sandbox):
    for key in (env("SANDGATE_OTHER_TENANT_KEY"), env("SANDGATE_TEST_ENV_KEY")):
        with pytest.raises(SandboxException) as info:
            Sandbox.connect(sandbox.sandbox_id, api_key=key)
        assert "not found" in str(info.value).lower()
        with pytest.raises(SandboxException):
            Sandbox.get_info(sandbox.sandbox_id, api_key=key)
        assert Sandbox.kill(sandbox.sandbox_id, api_key=key) is False
        listed = Sandbox.list(api_key=key).next_items()
        assert sandbox.sandbox_id not in [s.sandbox_id for s in listed]
    assert sandbox.is_running()


def test_envd_needs_the_sandboxs_own_token(sandbox):
    token = sandbox._envd_access_token
    assert envd(sandbox.sandbox_id, token).status_code == 200
    for bad in (None, "", "sat_wrong", token + "x"):
        r = envd(sandbox.sandbox_id, bad)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == 401
        assert "access token" in r.json()["message"]
    other = Sandbox.create(timeout=30)
    try:
        # One sandbox's token opens no other sandbox.
        assert envd(other.sandbox_id, token).status_code == 401
        assert envd(sandbox.sandbox_id, other._envd_access_token).status_code == 401
    finally:
        other.kill()
    # An id that is not (or no longer) a sandbox: E2B's "not running" answer.
    r = envd("sbx_nonexistent0000000", token)
    assert r.status_code == 502
    assert "was not found" in r.json()["message"]


def test_a_token_never_outlives_its_owners_key():
    status, created = admin("POST", "/v1/keys", {"name": "short-lived", "profile": "sandbox-user"})
    assert status == 201
    sbx = Sandbox.create(timeout=60, api_key=created["key"])
    try:
        assert sbx.commands.run("echo ok").stdout == "ok\n"
        assert admin("DELETE", "/v1/keys/" + created["id"])[0] == 204
        with pytest.raises(AuthenticationException):
            sbx.commands.run("echo no")
        r = envd(sbx.sandbox_id, sbx._envd_access_token)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "KEY_EXPIRED"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_each_command_is_an_execution_of_the_quota():
    key = env("SANDGATE_LIMITED_KEY")
    sbx = Sandbox.create(timeout=60, api_key=key)
    try:
        for i in range(3):
            assert sbx.commands.run(f"echo {i}").stdout == f"{i}\n"
        with pytest.raises(RateLimitException) as info:
            sbx.commands.run("echo one-too-many")
        assert "quota" in str(info.value).lower() or "executions" in str(info.value).lower()
        # Nothing ran: no process is left, and the count stays exhausted.
        assert sbx.commands.list() == []
    finally:
        sbx.kill()
    status, keys = admin("GET", "/v1/keys")
    limited = [k for k in keys["data"] if k["name"] == "limited"][0]
    assert limited["executionsRemaining"] == 0


def test_envd_calls_count_against_the_owners_rate_limits():
    key = env("SANDGATE_RATE_LIMITED_KEY")
    sbx = Sandbox.create(timeout=60, api_key=key)  # 1 of 4
    try:
        for i in range(3):  # 2, 3, 4
            sbx.commands.run("true")
        with pytest.raises(RateLimitException):
            sbx.commands.run("true")
        r = envd(sbx.sandbox_id, sbx._envd_access_token)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-remaining"] == "0"
    finally:
        Sandbox.kill(sbx.sandbox_id, api_key=env("SANDGATE_ADMIN_KEY"))


def test_scopes_of_the_owners_key_bind_its_sandboxes():
    sbx = Sandbox.create(timeout=60, api_key=env("SANDGATE_NO_EXECUTE_KEY"))
    try:
        with pytest.raises(SandboxException) as info:
            sbx.commands.run("echo should-not-run")
        assert "sandbox:execute" in str(info.value)
    finally:
        sbx.kill()
    with pytest.raises(SandboxException) as info:
        Sandbox.create(timeout=60, api_key=env("SANDGATE_READ_ONLY_KEY"))
    assert "403" in str(info.value)
    with pytest.raises(AuthenticationException):
        Sandbox.create(timeout=60, api_key="sg_live_notarealkeynotarealkeynotarea000000")


def test_every_envd_call_is_audited_for_the_owner(sandbox):
    sandbox.commands.run("true")
    status, me = admin("GET", "/v1/auth/whoami")
    status, rows = admin("GET", "/v1/audit?limit=1000")
    assert status == 200
    starts = [r for r in rows["data"] if r["path"] == "/process.Process/Start"]
    assert starts, "the Start call is in the audit log"
    assert starts[0]["outcome"] == "allowed"
    assert starts[0]["keyId"].startswith("key_")
    envd(sandbox.sandbox_id, "sat_wrong")
    status, rows = admin("GET", "/v1/audit?outcome=denied&limit=1000")
    assert any(
        r["path"] == "/process.Process/List" and r["reason"] == "invalid_access_token"
        for r in rows["data"]
    )
