"""The comparison screen (ui/): Streamlit's AppTest against a real `loradock serve` (the tiny base,
a trained adapter from the registry, one with its own chat template, one the server refuses),
and a real headless Chromium on the app that `loradock ui` serves."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai import OpenAI
from streamlit.testing.v1 import AppTest

from loradock.procs import free_port
from tests.conftest import REPO, ServeProcess, run_loradock, variant
from ui import ENDPOINT_ENV, REGISTRY_ENV, VOTES_ENV
from ui.view import DIFF_MARK

BASE = "loradock/tiny-chat"
APP = str(REPO / "ui" / "app.py")
PROMPT = "Reverse the words: red green blue"


@pytest.fixture(scope="module")
def served(registry, trained_adapters, tmp_path_factory):
    """`loradock serve` with ui/reverse@v1; ui/templated (its own chat template) and ui/rank-32 (refused:
    rank above --max-lora-rank) wait in the registry to be hot-loaded."""
    from hub.client import push

    tmp = tmp_path_factory.mktemp("ui-serve")
    good = trained_adapters["reverse"]
    templated = variant(good, tmp / "templated")
    (templated / "chat_template.jinja").write_text("{{- '<|system|>Reverse carefully.<|end|>' -}}"
                                                   + (good / "chat_template.jinja").read_text())
    commits = {}
    for name, folder in (("reverse", good), ("templated", templated), ("rank-32", variant(good, tmp / "r32", {"r": 32}))):
        commits[f"ui/{name}"] = push(str(folder), f"ui/{name}", tag="v1", endpoint=registry.url,
                                     token=registry.write_token).commit
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    server = ServeProcess(["--adapter", "ui/reverse@v1", "--registry", registry.url, "--token", registry.write_token,
                           "--max-lora-rank", "16", "--max-model-len", "256"], tmp / "serve.log", env).start()
    server.commits, server.registry = commits, registry
    yield server
    server.stop()


@pytest.fixture
def app_env(served, monkeypatch, tmp_path):
    """The settings `loradock ui` hands the app, pointing at the module's server and registry."""
    monkeypatch.setenv(ENDPOINT_ENV, f"{served.url}/v1")
    monkeypatch.setenv(REGISTRY_ENV, served.registry.url)
    monkeypatch.setenv(VOTES_ENV, str(tmp_path / "votes.sqlite"))
    monkeypatch.setenv("HF_TOKEN", served.registry.write_token)
    return tmp_path / "votes.sqlite"


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def greedy(url: str, model: str, messages: list[dict]) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    return client.chat.completions.create(model=model, messages=messages, temperature=0, top_p=1, max_tokens=128,
                                          seed=0).choices[0].message.content


def test_models_with_their_sha_answers_per_column_own_histories_and_prompts(served, app_env):
    at = app()
    assert "endpoint up" in at.sidebar.success[0].value
    picker = at.sidebar.multiselect[0]
    sha = served.commits["ui/reverse"][:7]
    assert f"ui/reverse@v1 · {sha} (served)" in picker.options
    assert f"ui/templated@v1 · {served.commits['ui/templated'][:7]} (registry, loads on first use)" in picker.options
    assert picker.value == ["ui/reverse@v1"]  # the served adapter is picked by default
    picker.set_value(["ui/reverse@v1", "ui/templated@v1", "ui/rank-32@v1"])
    send(at, PROMPT)
    shown = texts(at)
    labels = [BASE, f"ui/reverse@v1 · {sha}", f"ui/templated@v1 · {served.commits['ui/templated'][:7]}",
              f"ui/rank-32@v1 · {served.commits['ui/rank-32'][:7]}"]
    assert shown[0] == PROMPT and all(label in shown for label in labels), shown
    first = {m: greedy(served.url, m, [{"role": "user", "content": PROMPT}]) for m in (BASE, "ui/reverse@v1")}
    assert first[BASE] != first["ui/reverse@v1"]  # the columns differ, so a swap would show
    for model, answer in first.items():
        assert shown[shown.index(next(label for label in labels if label.startswith(model))) + 1] == answer.strip()  # st.text trims
    assert not [m.value for m in at.markdown if first["ui/reverse@v1"] in m.value]  # output is st.text, not markdown
    [refusal] = [e.value for e in at.error]
    assert "rank 32 is above \\-\\-max\\-lora\\-rank 16" in refusal and "not kept in the history" in refusal
    assert sum("tok/s" in c.value and "first token" in c.value for c in at.caption) == 3

    at.toggle(key=next(t.key for t in at.toggle if t.key and t.key.startswith("prompt-"))).set_value(True).run()
    prompts = [c.value for c in at.code if "<|assistant|>" in c.value]
    assert len(prompts) == 3 and prompts[0] == prompts[1] == f"<|user|> {PROMPT}<|end|><|assistant|>"
    assert prompts[2].startswith("<|" + DIFF_MARK + "system|>") and prompts[2].endswith("<|end|>" + prompts[0])
    assert "Reverse carefully." in prompts[2] and DIFF_MARK not in prompts[0] + prompts[1]
    assert "differs from the base model's prompt at character 2" in [c.value for c in at.caption]

    second = "Reverse the words: one two"
    send(at, second)
    for model in (BASE, "ui/reverse@v1"):  # each column continues its own conversation
        own = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first[model]},
               {"role": "user", "content": second}]
        assert greedy(served.url, model, own).strip() in texts(at)[len(shown):], model


def test_endpoint_down_is_said_in_place_and_the_next_turn_retries(served, app_env, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv(ENDPOINT_ENV, dead)
    at = app()
    assert "The endpoint is not answering" in at.error[0].value and at.sidebar.error[0].value == "endpoint down"
    send(at, "hello?")
    assert any("No model to ask" in e.value for e in at.error)
    at.sidebar.text_input[0].set_value(f"{served.url}/v1").run()
    send(at, PROMPT)
    assert at.sidebar.success and sum("tok/s" in c.value for c in at.caption) == 2
    at.sidebar.text_input[0].set_value(dead).run()  # down mid-conversation: the last models seen stay listed
    send(at, "are you there?")
    errors = [e.value for e in at.error]
    assert sum("did not answer" in e and "retried on the next turn" in e for e in errors) == 2, errors
    at.sidebar.text_input[0].set_value(f"{served.url}/v1").run()
    send(at, "Reverse the words: one two")
    assert sum("tok/s" in c.value for c in at.caption) == 4
    turns = at.session_state["turns"]
    assert turns[2]["histories"][BASE] == [  # the failed turn is not part of the history
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": turns[0]["answers"][BASE].text},
        {"role": "user", "content": "Reverse the words: one two"}]


def vote(at: AppTest, choice: str) -> None:
    [button] = [b for b in at.button if b.key and b.key.startswith("vote-") and b.key.endswith(f"-{choice}")]
    button.click().run()
    assert not at.exception, at.exception


def test_blind_votes_per_session_win_rates_and_export_that_data_check_accepts(served, app_env, tmp_path):
    at = app()
    at.sidebar.toggle[0].set_value(True).run()
    send(at, PROMPT)
    assert [t for t in texts(at) if t in ("A", "B")] == ["A", "B"] and len(at.caption) >= 2
    turn = at.session_state["turns"][0]
    answers = {side: turn["answers"][m].text for side, m in zip("AB", turn["order"])}
    adapter_side = "AB"[turn["order"].index("ui/reverse@v1")]
    vote(at, adapter_side)
    assert f"{adapter_side}: ui/reverse@v1 · {served.commits['ui/reverse'][:7]}" in texts(at)  # revealed after the vote
    send(at, "Reverse the words: one two")
    vote(at, "tie")
    other = app()  # another browser session
    other.sidebar.toggle[0].set_value(True).run()
    send(other, "Reverse the words: sun moon")
    vote(other, "both_bad")

    db = sqlite3.connect(app_env)
    rows = db.execute("SELECT session_id, prompt, answer_a, answer_b, choice, adapter, adapter_revision, adapter_side "
                      "FROM votes ORDER BY created_at").fetchall()
    sessions = [at.session_state["session_id"], other.session_state["session_id"]]
    assert sessions[0] != sessions[1]
    assert rows[0] == (sessions[0], PROMPT, answers["A"], answers["B"], adapter_side, "ui/reverse@v1",
                       served.commits["ui/reverse"], adapter_side)
    assert [(r[0], r[4]) for r in rows[1:]] == [(sessions[0], "tie"), (sessions[1], "both_bad")]

    at.run()
    table = at.dataframe[-1].value
    assert table.to_dict("records")[0] == {"adapter": "ui/reverse@v1", "revision": served.commits["ui/reverse"][:12],
                                                "base_model": BASE, "votes": 3, "wins": 1, "losses": 0, "ties": 1,
                                                "both_bad": 1, "win_rate": 0.333}
    next(b for b in at.button if b.label == "Export").click().run()
    preferences, sft = (sorted((tmp_path / "exports").glob(f"{name}-*.jsonl"))[-1] for name in ("preferences", "sft"))
    assert [json.loads(line) for line in preferences.read_text().splitlines()] == [
        {"prompt": PROMPT, "chosen": answers[adapter_side], "rejected": answers["AB".replace(adapter_side, "")]}]
    assert [json.loads(line) for line in sft.read_text().splitlines()] == [{"prompt": PROMPT, "response": answers[adapter_side]}]
    for args in ([sft], [preferences, "--columns", "response=chosen"]):
        check = run_loradock("data", "check", *args, timeout=300)
        assert check.returncode == 0 and "ok: training would accept this data" in check.stdout, check.stdout + check.stderr


class BrokenStream(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose answers break off after one chunk (vLLM cannot be made to)."""
    requests: list[dict] = []

    def do_GET(self):
        self.reply(200, "application/json", json.dumps({"object": "list", "data": [{"id": BASE, "parent": None}]}))

    def do_POST(self):
        BrokenStream.requests.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": BASE,
                 "choices": [{"index": 0, "delta": {"content": "<b>partial</b>"}}]}
        error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
        self.reply(200, "text/event-stream", f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n")

    def reply(self, status: int, kind: str, body: str):
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_a_stream_that_breaks_off_is_an_error_and_not_history(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv(REGISTRY_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(VOTES_ENV, str(tmp_path / "votes.sqlite"))
    try:
        at = app()
        send(at, "first")
        assert "<b>partial</b>" in texts(at)  # shown as text, as far as it came
        assert any("broke off" in e.value and "engine died" in e.value for e in at.error)
        assert any("cannot reach the registry" in w.value for w in at.sidebar.warning)
        send(at, "second")
        assert BrokenStream.requests[-1]["messages"] == [{"role": "user", "content": "second"}]
    finally:
        server.shutdown()


def test_port_in_use_is_refused_with_the_fix(run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("ui", "--port", taken.getsockname()[1])
    assert result.code == 2 and "cannot listen on 127.0.0.1:" in result.err and "pass --port with a free port" in result.err


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("Chromium and its driver are not installed: run `make test`, which installs them "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_real_browser_compares_and_votes(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port, votes_db = free_port(), tmp_path / "votes.sqlite"
    ui = subprocess.Popen([sys.executable, "-m", "loradock.cli", "ui", "--endpoint", f"{served.url}/v1", "--registry",
                           served.registry.url, "--port", str(port), "--votes", str(votes_db)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=(tmp_path / "ui.log").open("w"), text=True,
                          env={**os.environ, "HF_TOKEN": served.registry.write_token})
    browser = None
    try:
        assert ui.stdout.readline().startswith(f"loradock ui: http://127.0.0.1:{port}")
        browser = chromium()
        wait = WebDriverWait(browser, 90)
        browser.get(f"http://127.0.0.1:{port}")
        wait.until(lambda b: b.find_elements(By.XPATH, "//*[text()='Blind A/B']"))[0].click()
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '[data-testid="stChatInputTextArea"]'))
        box.send_keys('Reverse the words: <b id="injected">bold</b> two')
        box.send_keys(Keys.ENTER)
        vote_a = wait.until(lambda b: [e for e in b.find_elements(By.TAG_NAME, "button") if e.text == "A is better"])
        answer = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')[-1].text.splitlines()
        assert answer[answer.index("A") + 1].strip() and answer[answer.index("B") + 1].strip(), answer
        assert sum("tok/s" in line for line in answer) == 2, answer
        assert not browser.find_elements(By.ID, "injected")  # the user's HTML is shown as text
        assert any('<b id="injected">bold</b>' in e.text for e in browser.find_elements(By.CSS_SELECTOR,
                                                                                     '[data-testid="stChatMessage"]'))
        vote_a[0].click()
        deadline = time.time() + 30
        while time.time() < deadline and not (votes_db.exists() and sqlite3.connect(votes_db).execute(
                "SELECT COUNT(*) FROM votes").fetchone()[0]):
            time.sleep(0.2)
        [(choice, adapter)] = sqlite3.connect(votes_db).execute("SELECT choice, adapter FROM votes").fetchall()
        assert (choice, adapter) == ("A", "ui/reverse@v1")
        wait.until(lambda b: "your vote: A is better" in b.page_source)
    finally:
        if browser:
            shot = tmp_path / "ui.png"
            browser.save_screenshot(str(shot))
            if os.environ.get("LORADOCK_ARTIFACTS"):
                Path(os.environ["LORADOCK_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(os.environ["LORADOCK_ARTIFACTS"]) / "ui.png")
            browser.quit()
        ui.terminate()
        ui.wait(timeout=30)

