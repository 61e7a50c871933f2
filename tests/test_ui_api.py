"""``kotune ui``'s JSON API over hand-made run folders: states, curves, the token rule and path traversal.

The browser tests (test_ui_browser.py) run the page against a real training run; these run in a second."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from conftest import PLANTED_TOKEN

pytest.importorskip("starlette", reason="kotune ui needs its extra: pip install 'kotune[ui]'")

with warnings.catch_warnings():  # starlette 1.10 asks for httpx2 in its test client; the locked httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from kotune.config import Config  # noqa: E402
from kotune.training.claim import lock  # noqa: E402
from kotune.ui import launch, runs  # noqa: E402
from kotune.ui.server import create_app  # noqa: E402

SECRET = "not for the page"
POST = {"X-Kotune": "1"}


def make_run(root: Path, name: str, steps: int, saved: list[int], finished: bool = False, **train) -> Path:
    """A run folder as ``kotune train`` leaves it: config, ``steps`` logged steps, complete checkpoints at ``saved``."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = Config()
    cfg.train.output_dir, cfg.train.max_steps = str(folder), 10
    for key, value in train.items():
        setattr(cfg.train, key, value)
    (folder / "kotune_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-4, "tokens_per_s": 100.0 + s} for s in range(1, steps + 1)]
    records += [{"step": s, "eval_loss": 3.5 - 0.1 * s} for s in range(2, steps + 1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for step in saved:
        (folder / f"checkpoint-{step}").mkdir()
        (folder / f"checkpoint-{step}" / "COMPLETE").write_text("")
    if finished:
        (folder / "run_summary.json").write_text(json.dumps({"audit": ["data: 10 rows", PLANTED_TOKEN]}))
    return folder


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "done", 10, [10], finished=True)
    make_run(root, "stopped", 4, [2, 4])
    make_run(root, "crashed", 5, [2])
    make_run(root, "group/nested", 1, [])
    (tmp_path / "secret.txt").write_text(SECRET)
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text(SECRET)
    return root


@pytest.fixture
def client(root):
    return TestClient(create_app(root, []), base_url="http://127.0.0.1:8470")


def test_states_from_the_files_training_leaves(root):
    assert runs.run_state(root / "done", runs.read_metrics(root / "done")) == "finished"
    assert runs.run_state(root / "stopped", runs.read_metrics(root / "stopped")) == "interrupted"
    assert runs.run_state(root / "crashed", runs.read_metrics(root / "crashed")) == "failed"
    assert runs.run_state(root / "group/nested", []) == "failed"  # ended before its first checkpoint
    with lock(root / "crashed"):  # kotune train's own lock: held means running, whatever else the folder holds
        assert runs.lock_holder(root / "crashed") == os.getpid()
        assert runs.run_state(root / "crashed", []) == "running"
    assert runs.lock_holder(root / "crashed") is None  # released with the process's hold on it


def test_the_runs_list_and_a_runs_curves(client):
    listed = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(listed) == {"done", "stopped", "crashed", "group/nested"}
    assert listed["stopped"]["state"] == "interrupted" and listed["stopped"]["checkpoints"] == [2, 4]
    assert (listed["stopped"]["step"], listed["stopped"]["total_steps"], listed["stopped"]["done"]) == (4, 10, 0.4)
    detail = client.get("/api/runs/stopped").json()
    assert [r["loss"] for r in detail["metrics"] if "loss" in r] == pytest.approx([2.9, 2.8, 2.7, 2.6])
    assert [r["eval_loss"] for r in detail["metrics"] if "eval_loss" in r] == pytest.approx([3.3, 3.1])
    assert detail["plan"]["max_steps"] == 10 and detail["plan"]["effective_batch_size"] == 8
    assert client.get("/api/runs/group/nested").json()["name"] == "group/nested"


def test_eta_from_the_pace_since_the_lock_was_taken(root):
    folder = root / "crashed"
    with lock(folder):
        started = (folder / ".kotune-lock").stat().st_mtime
        os.utime(folder / "checkpoint-2", (started - 100, started - 100))  # the checkpoint it resumed from
        os.utime(folder / ".kotune-lock", (started - 30, started - 30))  # 3 steps (2 -> 5) in 30 s
        eta = runs.eta_seconds(folder, "running", 0.5, 5)
    assert eta == pytest.approx(50, rel=0.05)  # 5 steps left at 10 s each


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/..",
        "/api/runs/../secret.txt",
        "/api/runs/%2e%2e/secret.txt",
        "/api/runs/%2E%2E%2Fsecret.txt",
        "/api/runs/..%2f..%2fetc%2fpasswd",
        "/api/runs//etc",
        "/api/runs/not-a-run",
        "/api/runs/done/../../secret.txt",
        "/api/configs/..%2F..%2Fsecret.txt",
        "/api/configs/named/../../secret.txt",
        "/api/configs//etc/passwd",
        "/api/preview?config=../secret.txt",
        "/api/preview?config=/etc/passwd",
        "/static/..%2Fserver.py",
        "/static/%2e%2e/server.py",
        "/static/../../secret.txt",
    ],
)
def test_no_file_outside_the_runs_and_configs_is_served(client, path):
    response = client.get(path)
    assert response.status_code in (400, 404), response.text
    assert SECRET not in response.text and "root:" not in response.text and "create_app" not in response.text


def test_a_symlink_out_of_the_runs_directory_is_not_followed(root, client, tmp_path):
    outside = make_run(tmp_path / "elsewhere", "run", 2, [2])
    (root / "linked").symlink_to(outside)
    assert "linked" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]
    assert client.get("/api/runs/linked").status_code == 404
    assert "run/linked" not in client.get("/api/configs").json()["configs"]


def test_loopback_answers_only_for_a_loopback_host_and_changes_need_the_header(root):
    app = create_app(root, [])
    assert TestClient(app, base_url="http://localhost:8470").get("/api/runs").status_code == 200
    rebound = TestClient(app, base_url="http://evil.example:8470").get("/api/runs")
    assert rebound.status_code == 421 and "done" not in rebound.text
    local = TestClient(app, base_url="http://127.0.0.1:8470")
    assert local.post("/api/runs/done/stop").status_code == 403  # no X-Kotune: a cross-site form cannot add it
    assert local.post("/api/runs/done/stop", headers=POST).json()["error"] == "done is not running"


def test_another_host_needs_the_token(root):
    token = "t0ken-for-the-test-only-0123456789"
    client = TestClient(create_app(root, [], token), base_url="http://10.0.0.5:8470")
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    assert client.get("/api/runs?token=" + token).status_code == 401  # only the page takes it from the address
    entry = client.get("/?token=" + token, follow_redirects=False)
    assert entry.status_code == 303 and entry.headers["location"] == "/"  # the token leaves the address bar
    assert "httponly" in entry.headers["set-cookie"].lower()
    assert client.get("/api/runs").status_code == 200  # the cookie now carries it
    page = client.get("/")
    assert page.status_code == 200 and token not in page.text
    fresh = TestClient(create_app(root, [], token), base_url="http://10.0.0.5:8470")
    assert fresh.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_tokens_never_reach_the_page(root, client, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    config = root / "done" / "kotune_config.yaml"
    config.write_text(config.read_text().replace("run_name: null", f"run_name: {PLANTED_TOKEN}"))
    for path in ("/api/runs/done", "/api/configs/run/done", "/api/runs"):
        response = client.get(path)
        assert response.status_code == 200 and PLANTED_TOKEN not in response.text
    assert "<redacted>" in client.get("/api/runs/done").text


def test_the_editor_is_checked_by_kotunes_config_loader(root, client):
    good = f"train:\n  output_dir: {root / 'new-run'}\n  max_steps: 3\n"
    assert client.post("/api/configs/check", json={"text": good}, headers=POST).json() == {"ok": True, "error": None}
    typo = client.post("/api/configs/check", json={"text": good + "  learning_rat: 1\n"}, headers=POST).json()
    assert not typo["ok"] and "did you mean 'train.learning_rate'" in typo["error"]
    outside = client.post("/api/configs/check", json={"text": "train:\n  output_dir: /tmp/x\n"}, headers=POST).json()
    assert not outside["ok"] and "outside the runs directory" in outside["error"]
    saved = client.post("/api/configs/save", json={"name": "../../evil", "text": good}, headers=POST)
    assert saved.status_code == 400 and not (root.parent / "evil.yaml").exists()
    saved = client.post("/api/configs/save", json={"name": "mine", "text": good}, headers=POST).json()
    assert saved == {"config": "saved/mine.yaml"}
    assert client.get("/api/configs/saved/mine.yaml").json()["text"] == good


def test_a_non_finite_loss_reaches_the_page_as_null(root, client):
    with (root / "stopped" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": float("nan"), "skipped": True}) + "\n")
    losses = [r.get("loss") for r in client.get("/api/runs/stopped").json()["metrics"] if "loss" in r]
    assert losses[-1] is None and len(losses) == 5


def test_stop_signals_only_a_kotune_train_process(root, client):
    with lock(root / "crashed"):  # held by this test process, which is no `kotune train`
        refused = client.post("/api/runs/crashed/stop", headers=POST)
        assert refused.status_code == 400 and "not `kotune train`" in refused.json()["error"]
    assert not launch.is_kotune_train(os.getpid())


def test_kotune_ui_on_another_host_keeps_its_token_out_of_its_log(root, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))  # another address than the default: the token rule applies
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    argv = [sys.executable, "-m", "kotune.cli", "ui", str(root), "--host", "127.0.0.2", "--port", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        token_file, url = root / ".kotune-ui" / "token", f"http://127.0.0.2:{port}/api/runs"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as refused:
                assert refused.code == 401
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        address = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = address.split("?token=")[1]
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert {r["name"] for r in json.loads(response.read())["runs"]} >= {"done", "stopped"}
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())  # keeps the cookie, as one does
        with browser.open(address, timeout=5) as page:
            assert page.url.endswith(f":{port}/") and token not in page.read().decode()
        with browser.open(url, timeout=5) as response:
            assert response.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert str(token_file) in log.read_text() and token not in log.read_text()


def test_resume_reads_the_config_the_run_started_from(root, tmp_path):
    folder = (root / "stopped").resolve()
    assert launch.resume_config(root, folder, []) == folder / "kotune_config.yaml"
    other = tmp_path / "other.yaml"
    other.write_text(f"train:\n  output_dir: {root / 'crashed'}\n")
    named = tmp_path / "named.yaml"
    named.write_text(f"train:\n  output_dir: {root / 'stopped'}\n")
    assert launch.resume_config(root, folder, [other, named]) == named  # the named config training into it
    edited = launch.save_config(root, "edited", named.read_text())
    record = {"run": "stopped", "command": "kotune train ...", "config": str(edited), "pid": 1, "started": 0}
    (root / ".kotune-ui" / "launches").mkdir()
    (root / ".kotune-ui" / "launches" / "1.json").write_text(json.dumps({**record, "log": "1.log"}))
    assert launch.resume_config(root, folder, [other, named]) == edited  # what the page last launched it from
