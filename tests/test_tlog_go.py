"""A real tlog client reads the log: Go's golang.org/x/mod/sumdb/{note,tlog} (Debian packages
golang-go and golang-golang-x-mod-dev, built with GO111MODULE=off; .ci/run installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.http_server import http_log  # noqa: F401  (fixture)

HERE = Path(__file__).resolve().parent
GOPATH = "/usr/share/gocode"


@pytest.fixture(scope="module")
def tlogclient(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Go tlog interop test: .ci/run installs golang-go golang-golang-x-mod-dev")
        pytest.skip("SKIPPED LOUDLY: `go` is not installed, so the Go tlog interop test cannot run; "
                    "apt-get install golang-go golang-golang-x-mod-dev (.ci/run does)")
    if not Path(GOPATH, "src/golang.org/x/mod/sumdb/tlog").is_dir():
        pytest.fail("go is installed but golang.org/x/mod is not: apt-get install golang-golang-x-mod-dev")
    out = tmp_path_factory.mktemp("go") / "tlogclient"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": ""}
    if not os.environ.get("GOCACHE") and not os.environ.get("HOME"):
        env["GOCACHE"] = str(out.parent / "cache")  # else Go's per-user cache, reused across runs
    subprocess.run(["go", "build", "-o", str(out), str(HERE / "tlogclient" / "main.go")],
                   check=True, env=env, capture_output=True, timeout=240)
    return out


def test_go_tlog_client_verifies_the_log(http_log, tlogclient):
    run = subprocess.run([str(tlogclient), http_log.url, "audit", str(http_log.signer.verifier)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "OK: example.com/audit size 602" in run.stdout and "602 entries" in run.stdout


def test_go_tlog_client_rejects_another_key(http_log, tlogclient):
    from listener.note import Signer

    other = Signer.generate("example.com/audit").verifier
    run = subprocess.run([str(tlogclient), http_log.url, "audit", str(other)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "checkpoint signature" in run.stderr
