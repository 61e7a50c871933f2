"""``kotune ui`` in a real browser: headless Chromium from Debian's packages, driven by Selenium through the system
chromedriver (nothing downloads a browser), against the real server (``kotune ui``) and real tiny training runs.

One module, its tests in order over shared state: a run launched from the page trains while its curves grow, keeps
training across a restart of the server, stops into a resumable checkpoint and resumes; a run trained from the CLI
(with two eval reports, compared) looks the same; the Data page colours what ``kotune data preview --json`` labels;
the Chat page streams and stops. With KOTUNE_UI_SCREENSHOTS=DIR it saves a screenshot of each page there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path

import pytest
from conftest import PLANTED_TOKEN, TINY_TRAIN_ROWS, run_kotune, write_jsonl

pytest.importorskip("starlette", reason="kotune ui needs its extra: pip install 'kotune[ui]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (the dev extra)")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from kotune.ui.runs import lock_holder  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KOREAN_ANSWER = "햇빛이 공기에 산란하기 때문입니다."


def need_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    missing = "no chromium or chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":  # CI's set-up installs them: a missing browser is a failure there
        pytest.fail(missing)
    pytest.skip(missing)


def config_text(model: str, data: Path, output_dir: Path, **train) -> str:
    values = {
        "max_steps": 400,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 1,
        "eval_steps": 5,
        "save_steps": 1000,
        "optimizer": "adamw_torch",
        "learning_rate": 0.001,
        "min_free_disk_gb": 0,
        **train,
    }
    lines = [
        "model:",
        f"  path: {model}",
        "  quantization: none",
        "  compute_dtype: float32",
        "data:",
        f"  path: {data}",
        "  val_size: 0.2",
        "  cutoff_len: 128",
        "train:",
        f"  output_dir: {output_dir}",
        *[f"  {key}: {value}" for key, value in values.items()],
    ]
    return "\n".join(lines) + "\n"


class Ui:
    """The server under test (``kotune ui`` in its own process), restartable on the same port."""

    def __init__(self, root: Path, configs: list[Path], env: dict):
        self.root, self.runs, self.configs, self.env = root, root / "runs", configs, env
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.cli_run = None

    def start(self) -> None:
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("wb")
        argv = [sys.executable, "-m", "kotune.cli", "ui", str(self.runs), "--port", str(self.port)]
        argv += [word for config in self.configs for word in ("--config", str(config))]
        self.process = subprocess.Popen(argv, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/api/runs", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                assert self.process.poll() is None, self.logs()
                time.sleep(0.3)
        raise AssertionError(f"kotune ui did not answer in 60 s:\n{self.logs()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # as Ctrl-C in its terminal
        self.process.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("server-*.log")))


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_llama3_model):
    need_browser()
    root = tmp_path_factory.mktemp("ui")
    data = write_jsonl(root / "train.jsonl", TINY_TRAIN_ROWS)
    page = root / "page.yaml"
    page.write_text(config_text(tiny_llama3_model, data, root / "runs" / "page-run"), encoding="utf-8")
    cli = root / "cli.yaml"
    cli.write_text(config_text(tiny_llama3_model, data, root / "runs" / "cli-run", max_steps=3), encoding="utf-8")
    env = {**os.environ, "HF_TOKEN": PLANTED_TOKEN, "KOTUNE_CACHE": str(root / "cache")}
    server = Ui(root, [page, cli], env)
    server.start()
    with ThreadPoolExecutor(1) as background:  # the CLI's run trains while the page's tests run
        server.cli_run = background.submit(cli_run, server)
        yield server
    server.stop()
    for folder in (root / "runs").glob("*"):  # a run this module started and a failed test left training
        pid = lock_holder(folder)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(ui):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def visit(driver, ui: Ui, page: str) -> None:
    """A fresh load of the page (a change of the address's #part alone keeps the last page's content a while)."""
    driver.get("about:blank")
    driver.get(f"{ui.url}/#{page}")


def wait(driver, condition, timeout: float = 60, message: str = ""):
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.3, ignored_exceptions=[StaleElementReferenceException])
    return waiting.until(condition, message)


def by_id(driver, name: str):
    return driver.find_element("id", name)


def edit(driver, editor, text: str) -> None:
    """Replace the editor's text as typing would (its input event runs the check)."""
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", editor, text
    )


def runs_table(driver) -> dict[str, list[str]]:
    """The runs list as {run: its cells' text}, read at once (the page redraws it on every poll)."""
    return driver.execute_script(
        "const rows = {}; for (const tr of document.querySelectorAll('#runs-table tbody tr'))"
        " rows[tr.dataset.run] = [...tr.cells].map((td) => td.textContent); return rows;"
    )


def texts(driver, css: str) -> list[str]:
    """The text of each element ``css`` selects, read at once (the page redraws parts of itself on every poll)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", css)


def points(driver, chart: str = "loss") -> int:
    """How many points the chart draws (redrawn on every poll, so read in one call)."""
    found = driver.execute_script("return document.getElementById(arguments[0])?.dataset.points", f"chart-{chart}")
    return int(found or 0)


def shot(driver, name: str) -> None:
    folder = os.environ.get("KOTUNE_UI_SCREENSHOTS")
    if folder:
        time.sleep(0.5)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(2400, max(1000, height)))  # the whole page, for docs/ui
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))
        driver.set_window_size(1280, 1000)


def logged_steps(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def test_a_run_launched_from_the_page_trains_and_its_curves_grow(ui, browser):
    visit(browser, ui, "launch")
    wait(browser, lambda d: "named/page.yaml" in d.find_element("id", "launch-config").text)
    Select(by_id(browser, "launch-config")).select_by_value("named/page.yaml")
    wait(browser, lambda d: "page-run" in by_id(d, "launch-yaml").get_attribute("value"))
    editor = by_id(browser, "launch-yaml")
    written = editor.get_attribute("value")
    edit(browser, editor, written + "  learning_rat: 0.1\n")  # a typo in train: kotune's own loader names it
    wait(browser, lambda d: "did you mean 'train.learning_rate'" in by_id(d, "launch-check").text, 10)
    edit(browser, editor, written)
    wait(browser, lambda d: by_id(d, "launch-check").text.startswith("config OK"), 10)
    name = by_id(browser, "launch-name")
    name.clear()
    name.send_keys("page-run")
    by_id(browser, "launch-start").click()
    wait(browser, lambda d: by_id(d, "launch-command").text, 10)
    saved = ui.runs / ".kotune-ui" / "configs" / "page-run.yaml"
    command = f"{sys.executable} -m kotune.cli train {saved}"
    assert by_id(browser, "launch-command").text == command
    recent = "#launch-recent code.command"
    wait(browser, lambda d: texts(d, recent) == [command], 10)
    shot(browser, "launch")
    by_id(browser, "launch-open").click()
    wait(browser, lambda d: by_id(d, "run-state").text == "running", 90, ui.logs())
    wait(browser, lambda d: points(d) >= 2, 120, "no curve appeared")
    first = points(browser)
    wait(browser, lambda d: points(d) >= first + 2, 60, "the curve did not grow")
    assert points(browser, "lr") > 0 and points(browser, "tokens_per_s") > 0
    assert "kotune.cli train" in texts(browser, "#run-launches code.command")[0]
    shot(browser, "run")
    visit(browser, ui, "runs")
    wait(browser, lambda d: "running" in runs_table(d).get("page-run", []), 10)


def test_a_launched_run_survives_the_servers_restart(ui, browser):
    folder = ui.runs / "page-run"
    pid = lock_holder(folder)
    assert pid is not None
    ui.stop()
    before = len(logged_steps(folder))
    assert lock_holder(folder) == pid  # still training, the server gone
    time.sleep(2)
    ui.start()
    visit(browser, ui, "run/page-run")
    wait(browser, lambda d: by_id(d, "run-state").text == "running", 20)
    wait(browser, lambda d: points(d) > before + 1, 60, "the curve stopped growing across the restart")
    assert lock_holder(folder) == pid
    assert "kotune.cli train" in texts(browser, "#run-launches code.command")[0]


def test_stop_leaves_a_resumable_checkpoint_and_resume_continues_from_it(ui, browser):
    folder = ui.runs / "page-run"
    visit(browser, ui, "run/page-run")
    wait(browser, lambda d: by_id(d, "run-state").text == "running", 20)
    by_id(browser, "run-stop").click()
    wait(browser, lambda d: by_id(d, "run-state").text == "interrupted", 60, ui.logs())
    stopped_at = logged_steps(folder)[-1]
    assert (folder / f"checkpoint-{stopped_at}" / "COMPLETE").is_file()
    assert f"checkpoints: {stopped_at}" in by_id(browser, "run-progress").text
    by_id(browser, "run-resume").click()
    wait(browser, lambda d: by_id(d, "run-state").text == "running", 90)
    wait(browser, lambda d: logged_steps(folder)[-1] >= stopped_at + 2, 90, "the resumed run logged no step")
    steps = logged_steps(folder)
    assert steps == list(range(1, steps[-1] + 1))  # continued from the checkpoint: no step twice, none missing
    resumed = texts(browser, "#run-launches code.command")[0]
    assert resumed.endswith("--resume")
    by_id(browser, "run-stop").click()
    wait(browser, lambda d: by_id(d, "run-state").text == "interrupted", 60)


def cli_run(ui: Ui) -> list[subprocess.CompletedProcess]:
    """``kotune train`` of the CLI's config, then ``kotune eval --base`` and ``kotune eval --compare`` of it."""
    env = {"HF_TOKEN": PLANTED_TOKEN, "KOTUNE_CACHE": str(ui.root / "cache")}
    done = [run_kotune(["train", str(ui.configs[1])], env, cwd=ui.root)]
    run = ui.runs / "cli-run"
    for extra in (["--base"], ["--compare", str(run / "eval-base")]):
        if done[-1].returncode == 0:
            done.append(
                run_kotune(["eval", str(run), "--limit", "2", "--max-new-tokens", "4", *extra], env, cwd=ui.root)
            )
    return done


def test_a_run_from_the_cli_looks_the_same_with_its_compared_eval(ui, browser):
    done = ui.cli_run.result(timeout=600)  # started with the module, beside the page's run
    assert [p.returncode for p in done] == [0, 0, 0], done[-1].stderr[-3000:]
    run = ui.runs / "cli-run"
    visit(browser, ui, "runs")
    cells = wait(browser, lambda d: (table := runs_table(d)).get("cli-run") and table)
    assert cells["cli-run"][1] == "finished" and cells["page-run"][1] == "interrupted"
    assert cells["cli-run"][2] == "3 / 3" and cells["page-run"][2].endswith(" / 400")
    assert len(cells["cli-run"]) == len(cells["page-run"]) == 7
    shot(browser, "runs")
    visit(browser, ui, "run/cli-run")
    wait(browser, lambda d: by_id(d, "run-state").text == "finished", 20)
    assert points(browser) == 3 + 1  # three steps and the last step's evaluation
    assert "24 rows" in by_id(browser, "run-audit").text
    assert "started outside the page" in by_id(browser, "run-launches").text
    evals = by_id(browser, "run-evals")
    assert "compared with" in evals.text and "change" in evals.text and "pt" in evals.text
    Select(by_id(browser, "run-plan-gpu")).select_by_visible_text("L4")
    by_id(browser, "run-predict").click()  # kotune plan of the run's config, for a GPU this machine lacks
    wait(
        browser, lambda d: "predicted peak" in by_id(d, "run-predicted").text, 60, by_id(browser, "run-predicted").text
    )
    assert "plan for L4" in by_id(browser, "run-predicted").text and "fits" in by_id(browser, "run-predicted").text
    shot(browser, "run-finished")
    written = {p.name for p in (ui.runs / "page-run").iterdir() if not p.name.startswith("checkpoint-")}
    assert written <= {p.name for p in run.iterdir()}  # only what kotune train writes: nothing of the page's


def test_gpu_memory_curves_draw_from_the_logged_peaks(ui, browser):
    folder = ui.runs / "gpu-run"  # as a GPU run logs it (training/memory.py): CPU runs have no such figures
    folder.mkdir()
    shutil.copy(ui.runs / "cli-run" / "kotune_config.yaml", folder)
    records = [{"step": s, "loss": 2.0, "peak_allocated_gib": 5.0 + s, "peak_reserved_gib": 6.5 + s} for s in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    visit(browser, ui, "run/gpu-run")
    wait(browser, lambda d: points(d, "memory") == 4, 20)
    labels = texts(browser, "#chart-memory")[0]
    assert "peak_allocated_gib" in labels and "peak_reserved_gib" in labels and "8.50" in labels


def test_the_preview_colours_what_kotune_data_preview_labels(ui, browser):
    result = run_kotune(["data", "preview", str(ui.configs[0]), "--json"], {"KOTUNE_CACHE": str(ui.root / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {}
    for line in result.stdout.splitlines():
        row = json.loads(line)
        expected[row["row"]] = [(t, len(list(g))) for t, g in groupby(label != -100 for label in row["labels"])]
    visit(browser, ui, "data")
    wait(browser, lambda d: "named/page.yaml" in by_id(d, "data-config").text)
    Select(by_id(browser, "data-config")).select_by_value("named/page.yaml")
    by_id(browser, "data-show").click()
    rows = wait(browser, lambda d: d.find_elements("css selector", "#data-rows .row"), 60)
    shown = {}
    for row in rows:
        spans = row.find_elements("css selector", ".text span")
        shown[int(row.get_attribute("data-row"))] = [
            ("trained" in s.get_attribute("class"), int(s.get_attribute("data-tokens"))) for s in spans
        ]
    assert shown == expected and len(shown) == 5
    trained = [s.text for s in browser.find_elements("css selector", "#data-rows .trained")]
    assert any(KOREAN_ANSWER in text for text in trained)  # Hangul whole, not split bytes
    assert "\ufffd" not in by_id(browser, "data-rows").text
    assert by_id(browser, "data-findings").text
    shot(browser, "data")


def test_chat_streams_a_reply_and_stops(ui, browser):
    visit(browser, ui, "chat")
    wait(browser, lambda d: "cli-run" in by_id(d, "chat-model").text)
    Select(by_id(browser, "chat-model")).select_by_value("cli-run")
    by_id(browser, "chat-input").send_keys("하늘은 왜 파란가요?\n")
    reply = wait(browser, lambda d: d.find_element("css selector", ".msg.assistant"))
    wait(browser, lambda d: len(reply.text) > 0, 60, "no reply streamed")
    seen = len(reply.text)
    wait(browser, lambda d: len(reply.text) > seen, 30, "the reply did not grow")
    by_id(browser, "chat-stop").click()
    wait(browser, lambda d: reply.get_attribute("data-done") == "stopped", 10)
    length = len(reply.text)
    time.sleep(1)
    assert len(reply.text) == length and reply.text.endswith("[stopped]")
    by_id(browser, "chat-input").send_keys("한 번 더\n")  # the stopped turn left the model free for the next
    second = wait(browser, lambda d: d.find_elements("css selector", ".msg.assistant")[1:])[0]
    wait(browser, lambda d: len(second.text) > 0, 30, "no second reply")
    by_id(browser, "chat-stop").click()
    wait(browser, lambda d: second.get_attribute("data-done") == "stopped", 10)
    shot(browser, "chat")


def test_no_token_reaches_a_page_or_a_log(ui, browser):
    for page in ("runs", "run/page-run", "run/cli-run", "launch", "chat"):
        visit(browser, ui, page)
        time.sleep(1)
        assert PLANTED_TOKEN not in browser.page_source
    logs = [ui.logs(), *(p.read_text() for p in (ui.runs / ".kotune-ui" / "logs").glob("*.log"))]
    assert len(logs) == 3 and not [log for log in logs if PLANTED_TOKEN in log]
