"""JupyterLab as a user opens it: the README's `.venv/bin/jupyter lab`, run exactly so from the repository root (the
port, the token and "no browser" come from the environment, JUPYTER_PORT / JUPYTER_TOKEN / BROWSER, not from extra
arguments; as root, as in CI, a config file in JUPYTER_CONFIG_DIR allows root as `--allow-root` would), then
through its REST API and kernel websocket what the user's clicks do: list the project's notebooks, open one (a
session on the project's kernel `rpg`, the one `make install` registers), run a cell that imports `rpg` and reads a
results CSV."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO_ROOT

JUPYTER = Path(sys.executable).with_name("jupyter")
TOKEN = uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`jupyter lab` from the repository root; yields its base URL, ends it (and its kernels) afterwards."""
    if not JUPYTER.exists():
        pytest.skip(f"{JUPYTER} does not exist (make install)")
    port = _free_port()
    home = tmp_path_factory.mktemp("jupyter_home")
    env = {**os.environ, "JUPYTER_PORT": str(port), "JUPYTER_TOKEN": TOKEN, "BROWSER": "true",
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    config = home / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"allow_root": os.geteuid() == 0}}))
    env["JUPYTER_CONFIG_DIR"] = str(config)
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen([str(JUPYTER), "lab"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _api(url, "GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("jupyter lab did not answer in 60 s:\n" + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server shuts its kernels down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _api(url: str, method: str, path: str, body: dict | None = None) -> dict | list:
    req = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _execute(url: str, kernel_id: str, code: str, timeout: float = 120) -> tuple[str, str]:
    """Run `code` in the kernel over its websocket (as JupyterLab does); returns (status, stdout)."""
    from tornado.httpclient import HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    async def run() -> tuple[str, str]:
        ws_url = url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {TOKEN}"}))
        msg_id = uuid.uuid4().hex
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        stdout, status, idle = [], None, False
        while status is None or not idle:
            raw = await ws.read_message()
            if raw is None:
                raise ConnectionError("the kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                stdout.append(msg["content"]["text"])
            elif kind == "error":
                stdout.append("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply":
                status = msg["content"]["status"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        ws.close()
        return status, "".join(stdout)

    return IOLoop.current().run_sync(run, timeout=timeout)


def test_jupyter_lab_lists_notebooks_and_runs_the_rpg_kernel(lab, tmp_path):
    listing = _api(lab, "GET", "/api/contents/notebooks")
    names = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    assert names == {p.name for p in (REPO_ROOT / "notebooks").glob("*.ipynb")} and names, names
    assert "rpg" in _api(lab, "GET", "/api/kernelspecs")["kernelspecs"]

    # Open a notebook, as a double click does: a session on the notebook's kernel.
    session = _api(lab, "POST", "/api/sessions", {"path": "notebooks/finetune_curves.ipynb", "type": "notebook",
                                                  "name": "finetune_curves.ipynb", "kernel": {"name": "rpg"}})
    assert session["kernel"]["name"] == "rpg"
    csv = tmp_path / "results" / "table11.csv"
    csv.parent.mkdir()
    pd.DataFrame({"embedding": ["0000000011", "mean"], "rpg_best_acc": [91.5, 91.5]}).to_csv(csv, index=False)
    status, out = _execute(lab, session["kernel"]["id"], (
        "import rpg, pandas as pd\n"
        "print(rpg.__file__)\n"
        f"print(pd.read_csv({str(csv)!r}, dtype={{'embedding': str}}).to_json(orient='records'))\n"))
    assert status == "ok", out
    lines = out.strip().splitlines()
    assert Path(lines[0]).resolve() == (REPO_ROOT / "rpg" / "__init__.py").resolve()  # this checkout's rpg
    assert json.loads(lines[1]) == [{"embedding": "0000000011", "rpg_best_acc": 91.5},
                                    {"embedding": "mean", "rpg_best_acc": 91.5}]
    _api(lab, "DELETE", f"/api/sessions/{session['id']}")
