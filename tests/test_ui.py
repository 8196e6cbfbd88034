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

from loradock.procs import free_port, loradock_command
from tests.conftest import REPO, ServeProcess, run_loradock, variant
from ui import ENDPOINT_ENV, PAIRS_ENV, REGISTRY_ENV, VOTES_ENV
from ui.view import DIFF_MARK

BASE = "loradock/tiny-chat"
APP = str(REPO / "ui" / "app.py")
PROMPT = "Reverse the words: red green blue"


def to_rank_32(weights: dict) -> dict:
    """The same adapter at rank 32: lora_A (r, in) gains zero rows, lora_B (out, r) zero columns."""
    import torch

    def padded(name, w):
        if "lora_A" in name:
            return torch.cat([w, w.new_zeros(32 - w.shape[0], w.shape[1])], 0)
        return torch.cat([w, w.new_zeros(w.shape[0], 32 - w.shape[1])], 1) if "lora_B" in name else w

    return {name: padded(name, w).contiguous() for name, w in weights.items()}


@pytest.fixture(scope="module")
def served(registry, trained_adapters, tmp_path_factory):
    """`loradock serve` with ui/reverse@v1; ui/reverse@v2 (the sort adapter, pushed as a second revision),
    ui/templated (its own chat template) and ui/rank-32 (refused: rank above --max-lora-rank) wait in the
    registry to be hot-loaded."""
    from hub.client import Registry

    tmp = tmp_path_factory.mktemp("ui-serve")
    good = trained_adapters["reverse"]
    templated = variant(good, tmp / "templated")
    (templated / "chat_template.jinja").write_text("{{- '<|system|>Reverse carefully.<|end|>' -}}"
                                                   + (good / "chat_template.jinja").read_text())
    # The adapters live in an organisation alice writes to (the registry refuses a namespace nobody owns).
    subprocess.run(loradock_command("hub", "org", "add", "ui", "--member", "alice:write", "--root", registry.root),
                   check=True, capture_output=True)
    commits, door = {}, Registry(registry.url, registry.write_token)
    for name, folder in (("reverse", good), ("templated", templated), ("rank-32", variant(good, tmp / "r32", {"r": 32}, to_rank_32))):
        commits[f"ui/{name}"] = door.push(folder, f"ui/{name}", tag="v1").commit
    commits["ui/reverse@v2"] = door.push(trained_adapters["sort"], "ui/reverse", tag="v2").commit
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
    monkeypatch.setenv(PAIRS_ENV, str(tmp_path / "no-canary-pairs"))  # not the pairs other tests' servers sampled
    monkeypatch.setenv("LORADOCK_TOKEN", served.registry.write_token)
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
    # The prompt as the template renders it: the tiny base's decoder no longer shows a space after <|user|>.
    assert len(prompts) == 3 and prompts[0] == prompts[1] == f"<|user|>{PROMPT}<|end|><|assistant|>"
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
    monkeypatch.setenv(ENDPOINT_ENV, f"{served.url}/v1")  # the endpoint comes up (AppTest runs the app in-process)
    send(at, PROMPT)
    assert at.sidebar.success and sum("tok/s" in c.value for c in at.caption) == 2
    monkeypatch.setenv(ENDPOINT_ENV, dead)  # down mid-conversation: the last models seen stay listed
    send(at, "are you there?")
    errors = [e.value for e in at.error]
    assert sum("did not answer" in e and "retried on the next turn" in e for e in errors) == 2, errors
    monkeypatch.setenv(ENDPOINT_ENV, f"{served.url}/v1")
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
    rows = db.execute("SELECT session_id, prompt, answer_a, answer_b, choice, model_a, repo_a, revision_a, model_b, "
                      "repo_b, revision_b FROM votes ORDER BY created_at").fetchall()
    sessions = [at.session_state["session_id"], other.session_state["session_id"]]
    assert sessions[0] != sessions[1]
    sides = {"ui/reverse@v1": ("ui/reverse@v1", "ui/reverse", served.commits["ui/reverse"]), BASE: (BASE, "", BASE)}
    assert rows[0] == (sessions[0], PROMPT, answers["A"], answers["B"], adapter_side,
                       *sides[turn["order"][0]], *sides[turn["order"][1]])
    assert [(r[0], r[4]) for r in rows[1:]] == [(sessions[0], "tie"), (sessions[1], "both_bad")]

    at.run()
    pair, ranking = (table.value.to_dict("records") for table in at.dataframe[-2:])
    assert {k: pair[0][k] for k in ("model_x", "revision_x", "model_y", "revision_y", "votes", "wins", "losses",
                                    "ties", "both_bad", "win_rate")} == {
        "model_x": "ui/reverse@v1", "revision_x": served.commits["ui/reverse"][:12], "model_y": BASE,
        "revision_y": BASE, "votes": 3, "wins": 1, "losses": 0, "ties": 1, "both_bad": 1, "win_rate": 0.667}
    assert pair[0]["low"] <= 0.667 <= pair[0]["high"] and len(pair) == 1
    assert [r["model"] for r in ranking] == ["ui/reverse@v1", BASE] and ranking[0]["rating"] > 1000
    next(b for b in at.button if b.label == "Export").click().run()
    preferences, sft = (sorted((tmp_path / "exports").glob(f"*/{name}.jsonl"))[-1] for name in ("preferences", "sft"))
    assert [json.loads(line) for line in preferences.read_text().splitlines()] == [
        {"prompt": PROMPT, "chosen": answers[adapter_side], "rejected": answers["AB".replace(adapter_side, "")]}]
    assert [json.loads(line) for line in sft.read_text().splitlines()] == [{"prompt": PROMPT, "response": answers[adapter_side]}]
    for args in ([sft], [preferences, "--columns", "response=chosen"]):
        check = run_loradock("data", "check", *args, timeout=300)
        assert check.returncode == 0 and "ok: training would accept this data" in check.stdout, check.stdout + check.stderr


def test_blind_compares_two_revisions_of_one_adapter_and_the_votes_keep_both_commits(served, app_env):
    at = app()
    at.sidebar.toggle[0].set_value(True).run()
    first, second = at.selectbox(key="blind-first"), at.selectbox(key="blind-second")
    assert (first.value, second.value) == ("ui/reverse@v1", BASE)  # by default the adapter against its base
    v1, v2 = served.commits["ui/reverse"], served.commits["ui/reverse@v2"]
    assert f"ui/reverse@v2 · {v2[:7]} (registry, loads on first use)" in first.options
    first.set_value("ui/reverse@v1").run()
    at.selectbox(key="blind-second").set_value("ui/reverse@v1").run()
    assert any("two different models" in w.value for w in at.sidebar.warning)
    at.selectbox(key="blind-first").set_value("ui/reverse@v2").run()
    send(at, PROMPT)
    turn = at.session_state["turns"][0]
    assert sorted(turn["order"]) == ["ui/reverse@v1", "ui/reverse@v2"] and turn["blind"]
    assert [t for t in texts(at) if t in ("A", "B")] == ["A", "B"]
    v2_side = "AB"[turn["order"].index("ui/reverse@v2")]
    vote(at, v2_side)
    assert f"{v2_side}: ui/reverse@v2 · {v2[:7]}" in texts(at)  # revealed after the vote
    sides = {"ui/reverse@v1": ("ui/reverse@v1", "ui/reverse", v1), "ui/reverse@v2": ("ui/reverse@v2", "ui/reverse", v2)}
    assert sqlite3.connect(app_env).execute(
        "SELECT choice, model_a, repo_a, revision_a, model_b, repo_b, revision_b FROM votes").fetchall() == [
        (v2_side, *sides[turn["order"][0]], *sides[turn["order"][1]])]
    pair, ranking = (table.value.to_dict("records") for table in at.dataframe[-2:])
    assert [(p["model_x"], p["revision_x"], p["model_y"], p["revision_y"], p["wins"]) for p in pair] == [
        ("ui/reverse@v2", v2[:12], "ui/reverse@v1", v1[:12], 1)]
    assert [(r["model"], r["revision"]) for r in ranking] == [("ui/reverse@v2", v2[:12]), ("ui/reverse@v1", v1[:12])]


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


def votes_landed(db: Path, count: int, timeout: float = 30) -> list[tuple]:
    """(choice, model_a, model_b) of each vote, oldest first, once there are `count` of them."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (db.exists() and sqlite3.connect(db).execute(
            "SELECT COUNT(*) FROM votes").fetchone()[0] >= count):
        time.sleep(0.2)
    rows = sqlite3.connect(db).execute("SELECT choice, model_a, model_b FROM votes ORDER BY created_at").fetchall()
    assert len(rows) == count, rows
    return rows


def pick(wait, label: str, option: str) -> None:
    """Choose the option that starts with `option` in the selectbox labelled `label` (a combo box: type
    over its value, then click the option it lists)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def field(b):
        return next(iter(b.find_elements(By.CSS_SELECTOR, f'input[role="combobox"][aria-label="{label}"]')), None)

    typed = wait.until(field)
    typed.click()
    typed.send_keys(Keys.CONTROL, "a")
    typed.send_keys(option)
    wait.until(lambda b: [o for o in b.find_elements(By.CSS_SELECTOR, '[role="option"]')
                          if o.text.startswith(option + " ")])[0].click()
    wait.until(lambda b: (field(b).get_attribute("value") or "").startswith(option + " "))


def test_a_real_browser_compares_and_votes(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port, votes_db = free_port(), tmp_path / "votes.sqlite"
    ui = subprocess.Popen([sys.executable, "-m", "loradock.cli", "ui", "--base-url", f"{served.url}/v1", "--registry",
                           served.registry.url, "--port", str(port), "--votes", str(votes_db),
                           "--canary-pairs", str(tmp_path / "no-canary-pairs")], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=(tmp_path / "ui.log").open("w"), text=True,
                          env={**os.environ, "LORADOCK_TOKEN": served.registry.write_token})
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
        [(choice, *models)] = votes_landed(votes_db, 1)
        assert choice == "A" and set(models) == {BASE, "ui/reverse@v1"}
        wait.until(lambda b: "your vote: A is better" in b.page_source)

        # Two revisions of one adapter, picked in the sidebar's two boxes.
        pick(wait, "Blind A/B: compare", "ui/reverse@v2")
        pick(wait, "with", "ui/reverse@v1")
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '[data-testid="stChatInputTextArea"]'))
        box.send_keys("Reverse the words: one two")
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: [e for e in b.find_elements(By.TAG_NAME, "button") if e.text == "B is better"])[0].click()
        _, (choice, *models) = votes_landed(votes_db, 2)
        assert choice == "B" and set(models) == {"ui/reverse@v1", "ui/reverse@v2"}
        revisions = sqlite3.connect(votes_db).execute(
            "SELECT revision_a, revision_b FROM votes ORDER BY created_at DESC LIMIT 1").fetchone()
        assert set(revisions) == {served.commits["ui/reverse"], served.commits["ui/reverse@v2"]}
        wait.until(lambda b: "your vote: B is better" in b.page_source)
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



# --- where the serving key goes, and who may use the screen -------------------------------------

KEY, HUB_TOKEN, PASSWORD = "serving-key-5f2c", "hub-token-9d1e", "correct horse battery"


class Recorder(BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible endpoint that keeps every request it receives as (path, Authorization)."""
    seen: list[tuple[str, str | None]]

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("authorization")))
        self.reply("application/json", {"object": "list", "data": [{"id": BASE, "parent": None}]})

    def do_POST(self):
        self.seen.append((self.path, self.headers.get("authorization")))
        self.rfile.read(int(self.headers["content-length"]))
        if self.path.endswith("/detokenize"):
            return self.reply("application/json", {"prompt": "<|user|> hello<|end|><|assistant|>"})
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": BASE, "prompt_token_ids": [1, 2],
                 "choices": [{"index": 0, "delta": {"content": "recorded answer"}}]}
        usage = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": BASE, "choices": [],
                 "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
        self.reply("text/event-stream", f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n")

    def reply(self, kind: str, body):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def listener():
    """start() -> (URL, the requests it received): a real local HTTP server that records what reaches it."""
    servers = []

    def start() -> tuple[str, list]:
        seen = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), type("Recorded", (Recorder,), {"seen": seen}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def launch_settings(monkeypatch, tmp_path, endpoint: str, password: str | None = None) -> None:
    """What `loradock ui --base-url ENDPOINT [--password ...]` hands the app, with a serving key and a Hub token."""
    monkeypatch.setenv(ENDPOINT_ENV, f"{endpoint}/v1")
    monkeypatch.setenv(REGISTRY_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(VOTES_ENV, str(tmp_path / "votes.sqlite"))
    monkeypatch.setenv("LORADOCK_API_KEY", KEY)
    monkeypatch.setenv("LORADOCK_TOKEN", HUB_TOKEN)
    if password:
        monkeypatch.setenv("LORADOCK_UI_PASSWORD", password)
    else:
        monkeypatch.delenv("LORADOCK_UI_PASSWORD", raising=False)


def point_everything_at(at: AppTest, url: str) -> AppTest:
    """Everything a visitor can set from the page: every text field, the query string, the session state."""
    for box in at.text_input:
        box.set_value(url)
    for name in ("endpoint", "registry", "url", "base_url", "endpoint_url"):
        at.query_params[name] = url
        at.session_state[name] = url
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_serving_key_goes_only_to_the_launch_endpoint_whatever_the_visitor_sets(listener, monkeypatch, tmp_path):
    launch, received = listener()
    elsewhere, stolen = listener()
    launch_settings(monkeypatch, tmp_path, launch)
    at = point_everything_at(app(), f"{elsewhere}/v1")
    assert any(f"{launch}/v1" in t for t in texts(at.sidebar)), "the endpoint is shown (read-only)"
    send(at, "hello")
    at.toggle(key=next(t.key for t in at.toggle if t.key and t.key.startswith("prompt-"))).set_value(True).run()
    point_everything_at(at, f"{elsewhere}/v1")
    send(at, "again")
    assert not stolen, f"the visitor's URL received {stolen}"
    assert {"/v1/models", "/v1/chat/completions", "/detokenize"} <= {path for path, _ in received}
    assert {auth for _, auth in received} == {f"Bearer {KEY}"}
    assert "recorded answer" in texts(at)


def test_without_the_password_nothing_is_sent_and_no_model_is_shown(listener, monkeypatch, tmp_path):
    launch, received = listener()
    launch_settings(monkeypatch, tmp_path, launch, password=PASSWORD)
    at = app()
    assert not received and not at.selectbox and not at.multiselect and not at.chat_input and not at.tabs
    [box] = at.text_input
    box.set_value(PASSWORD[:-1])
    at.form_submit_button[0].click().run()
    assert any("wrong password" in e.value for e in at.error) and not received and not at.selectbox
    point_everything_at(at, PASSWORD)  # a query string or a session value is not the password
    assert not received and not at.selectbox
    at.text_input[0].set_value(PASSWORD)
    at.form_submit_button[0].click().run()
    assert at.selectbox[0].options == [BASE] and "endpoint up" in at.sidebar.success[0].value
    send(at, "hello")
    assert "recorded answer" in texts(at)
    assert {auth for _, auth in received} == {f"Bearer {KEY}"}


def test_listening_beyond_localhost_without_a_password_is_refused_with_the_fix(run_cli, monkeypatch):
    started = []
    monkeypatch.delenv("LORADOCK_UI_PASSWORD", raising=False)
    monkeypatch.setattr("loradock.procs.Service", lambda *args, **kwargs: started.append(args) or pytest.fail(
        "Streamlit was started on 0.0.0.0 with no password"))
    result = run_cli("ui", "--host", "0.0.0.0", "--port", free_port())
    assert result.code == 2 and not started
    assert "0.0.0.0" in result.err and "--password" in result.err and "LORADOCK_UI_PASSWORD" in result.err, result.err
    assert "--insecure-no-password" in result.err


def start_up_message(ui: subprocess.Popen, timeout: float = 120) -> str:
    """What `loradock ui` printed up to its access line (or until it exits, or `timeout` s): never blocks on a
    line that does not come."""
    lines = []

    def read():
        for line in ui.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while time.time() < deadline and reader.is_alive() and not any("listening on" in line for line in lines):
        time.sleep(0.2)
    return "".join(lines)


def test_beyond_localhost_the_start_up_says_access_needs_the_password_and_the_browser_asks_for_it(listener, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    launch, received = listener()
    port = free_port()
    env = {**os.environ, "LORADOCK_API_KEY": KEY, "LORADOCK_UI_PASSWORD": PASSWORD}
    ui = subprocess.Popen([sys.executable, "-m", "loradock.cli", "ui", "--host", "0.0.0.0", "--port", str(port),
                           "--base-url", f"{launch}/v1", "--registry", f"http://127.0.0.1:{free_port()}",
                           "--votes", str(tmp_path / "votes.sqlite")], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=(tmp_path / "ui.log").open("w"), text=True, env=env)
    browser = None
    try:
        started = start_up_message(ui)
        assert f"0.0.0.0:{port}" in started and "password" in started and "LORADOCK_UI_PASSWORD" in started, started
        assert PASSWORD not in started
        browser = chromium()
        wait = WebDriverWait(browser, 90)
        browser.get(f"http://127.0.0.1:{port}")
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, 'input[type="password"]'))
        time.sleep(2)  # had the page asked the endpoint anything, it would have by now
        assert not received and "endpoint up" not in browser.page_source
        box.send_keys(PASSWORD)
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Open").click()
        wait.until(lambda b: "endpoint up" in b.page_source)
        assert {auth for _, auth in received} == {f"Bearer {KEY}"}
    finally:
        if browser:
            browser.quit()
        ui.terminate()
        ui.wait(timeout=30)


VOTER = """
import sys
from pathlib import Path
from ui import votes
for n in range(300):
    votes.record(Path(sys.argv[1]), votes.Vote(f"process-{sys.argv[2]}", f"turn-{n}", "", "p", "a", "b", "AB"[n % 2],
                                               votes.Side("base"), votes.Side("org/adapter@v1", "org/adapter", "sha")))
"""


def four_voters(db: Path) -> None:
    voters = [subprocess.Popen([sys.executable, "-c", VOTER, str(db), str(i)], cwd=REPO) for i in range(4)]
    assert [v.wait(timeout=300) for v in voters] == [0] * 4


def test_votes_from_four_concurrent_processes_all_land(tmp_path):
    db = tmp_path / "votes.sqlite"
    four_voters(db)
    assert sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT session_id) FROM votes").fetchone() == (1200, 4)
    from ui import ratings, votes

    [pair] = ratings.pairs(votes.outcomes(db), resamples=10)
    assert (pair["model_x"], pair["revision_x"], pair["revision_y"], pair["votes"], pair["wins"]) == (
        "org/adapter@v1", "sha", "base", 1200, 600)


# The first schema: base model against one adapter, on the side adapter_side.
FIRST_SCHEMA = """CREATE TABLE votes (session_id TEXT NOT NULL, turn_id TEXT NOT NULL, created_at REAL NOT NULL,
    system TEXT NOT NULL, prompt TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'both_bad')), base_model TEXT NOT NULL,
    adapter TEXT NOT NULL, adapter_revision TEXT NOT NULL, adapter_side TEXT NOT NULL CHECK (adapter_side IN ('A', 'B')),
    PRIMARY KEY (session_id, turn_id))"""


def first_schema_votes(db: Path, count: int = 10) -> None:
    with sqlite3.connect(db) as old:
        old.execute(FIRST_SCHEMA)
        old.executemany("INSERT INTO votes VALUES (?, ?, ?, '', 'p', 'a', 'b', ?, 'base', 'org/adapter@v1', 'sha1', ?)",
                        [("old", f"turn-{n}", n, "A", "AB"[n % 2]) for n in range(count)])


def test_a_first_schema_database_is_migrated_in_place_under_four_concurrent_voters(tmp_path):
    db = tmp_path / "votes.sqlite"
    first_schema_votes(db)
    four_voters(db)  # each process finds the old table; one migrates, the others wait for it and find it done
    rows = sqlite3.connect(db).execute("SELECT turn_id, model_a, repo_a, revision_a, model_b, repo_b, revision_b "
                                       "FROM votes WHERE session_id = 'old' ORDER BY created_at").fetchall()
    assert rows[:2] == [("turn-0", "org/adapter@v1", "org/adapter", "sha1", "base", "", "base"),
                        ("turn-1", "base", "", "base", "org/adapter@v1", "org/adapter", "sha1")]
    assert len(rows) == 10
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM votes").fetchone() == (1210,)
    columns = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(votes)")}
    assert not columns & {"base_model", "adapter", "adapter_side"} and {"model_a", "revision_b"} <= columns


# --- loradock votes report / export ---------------------------------------------------------------

def some_votes(db: Path) -> None:
    """alice/reverse@v1 against the base, alice/reverse@v2 against @v1, and ties that teach nothing."""
    from ui import votes

    base, v1 = votes.Side(BASE), votes.Side("alice/reverse@v1", "alice/reverse", "a" * 40)
    v2 = votes.Side("alice/reverse@v2", "alice/reverse", "b" * 40)
    table = [(base, v1, "B", "p1"), (v1, base, "A", "p2"), (v1, base, "tie", "p3"), (v2, v1, "A", "p4"),
             (v1, v2, "B", "p5"), (v1, v2, "A", "p6"), (v2, v1, "both_bad", "p7")]
    for n, (a, b, choice, prompt) in enumerate(table):
        votes.record(db, votes.Vote("s", f"t{n}", "be brief" if n == 3 else "", prompt, f"{a.model} says {prompt}",
                                    f"{b.model} says {prompt}", choice, a, b))


def test_votes_report_prints_the_pairs_and_the_ranking(run_cli, tmp_path):
    db = tmp_path / "votes.sqlite"
    some_votes(db)
    result = run_cli("votes", "report", "--votes", db, "--resamples", 50)
    assert result.code == 0, result.err
    assert "| alice/reverse@v2 | bbbbbbbbbbbb | alice/reverse@v1 | aaaaaaaaaaaa | 4 | 2 | 1 | 0 | 1 | 0.625 |" in result.out
    assert "| alice/reverse@v1 | aaaaaaaaaaaa | loradock/tiny-chat | loradock/tiny-chat | 3 | 2 | 0 | 1 | 0 | 0.833 |" \
        in result.out
    assert "Bradley-Terry ranking" in result.out and "| 1 | alice/reverse@v2 |" in result.out
    result = run_cli("votes", "report", "--votes", db, "--format", "json", "--output", tmp_path / "report.json",
                     "--resamples", 50)
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.code == 0 and [r["model"] for r in report["ranking"]] == ["alice/reverse@v2", "alice/reverse@v1", BASE]
    assert {(r["model_x"], r["model_y"]) for r in report["pairs"]} == {("alice/reverse@v2", "alice/reverse@v1"),
                                                                       ("alice/reverse@v1", BASE)}
    missing = run_cli("votes", "report", "--votes", tmp_path / "none.sqlite")
    assert missing.code == 2 and "no votes database at" in missing.err and "--votes" in missing.err
    assert not (tmp_path / "none.sqlite").exists()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_votes_export_selects_a_revision_and_pushes_both_files_in_one_dataset_commit(run_cli, registry, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    db, out = tmp_path / "votes.sqlite", tmp_path / "export"
    some_votes(db)
    result = run_cli("votes", "export", "--votes", db, "--revision", "b" * 12, "--output", out, "--push",
                     "alice/reverse-votes", "--registry", registry.url, "--token", registry.write_token)
    assert result.code == 0, result.err
    assert jsonl(out / "preferences.jsonl") == [  # v2 against v1, decided: p4, p5 (v2 won), p6 (v1 won)
        {"prompt": "p4", "chosen": "alice/reverse@v2 says p4", "rejected": "alice/reverse@v1 says p4",
         "system": "be brief"},
        {"prompt": "p5", "chosen": "alice/reverse@v2 says p5", "rejected": "alice/reverse@v1 says p5"},
        {"prompt": "p6", "chosen": "alice/reverse@v1 says p6", "rejected": "alice/reverse@v2 says p6"}]
    assert jsonl(out / "sft.jsonl")[1] == {"prompt": "p5", "response": "alice/reverse@v2 says p5"}
    commit = result.out.split("commit ")[-1].strip()
    assert f"--data datasets/alice/reverse-votes@{commit}/preferences.jsonl" in result.out
    api = HfApi(endpoint=registry.url, token=registry.write_token)
    [latest] = api.list_repo_commits("alice/reverse-votes", repo_type="dataset")[:1]
    assert latest.commit_id == commit and len(commit) == 40
    for name in ("preferences.jsonl", "sft.jsonl"):
        pushed = hf_hub_download("alice/reverse-votes", name, repo_type="dataset", revision=commit,
                                 endpoint=registry.url, token=registry.write_token)
        assert Path(pushed).read_bytes() == (out / name).read_bytes()
    everything = run_cli("votes", "export", "--votes", db, "--adapter", "alice/reverse", "--output", tmp_path / "all")
    assert everything.code == 0 and len(jsonl(tmp_path / "all" / "sft.jsonl")) == 5  # every decided vote has it


def test_votes_export_without_decided_votes_is_refused_and_writes_nothing(run_cli, tmp_path):
    db, out = tmp_path / "votes.sqlite", tmp_path / "export"
    some_votes(db)
    for flags in (["--revision", "c" * 40], ["--adapter", "bob/other"], ["--revision", BASE, "--adapter", "alice/reverse@v2"]):
        result = run_cli("votes", "export", "--votes", db, "--output", out, *flags)
        assert result.code == 2 and "no decided votes" in result.err and flags[1] in result.err, result.err
        assert "alice/reverse @ " + "b" * 40 in result.err  # what it could select instead
        assert not out.exists()
    bad = run_cli("votes", "export", "--votes", db, "--output", out, "--push", "no-namespace")
    assert bad.code == 2 and "invalid repo id 'no-namespace'" in bad.err and not out.exists()


def test_the_canary_tab_shows_sampled_pairs_blind_and_records_both_commits(monkeypatch, tmp_path):
    """Pairs `loradock serve` sampled from canary traffic (written here in its format): shown one at a
    time, A and B in a per-session order, each vote stored with the two commits it compared."""
    from loradock import pairs

    stable, candidate = "a" * 40, "b" * 40
    written = [pairs.CanaryPair(f"pair-{i}", 1000.0 + i, "alice/reverse", "prod", stable, candidate, "be brief",
                                f"Reverse the words: x{i} y{i}", f"y{i} x{i}", f"x{i} y{i}") for i in range(2)]
    for pair in written:
        pairs.append(tmp_path / "serve" / "canary-pairs-8000.jsonl", pair)
    (tmp_path / "serve" / "canary-pairs-8001.jsonl").write_text("not a pair\n{\"id\": 1}\n")  # skipped
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv(REGISTRY_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(VOTES_ENV, str(tmp_path / "votes.sqlite"))
    monkeypatch.setenv(PAIRS_ENV, str(tmp_path / "serve"))
    at = app()
    assert any("2 pair(s) sampled from canary traffic" in c.value for c in at.caption)
    assert written[0].prompt in texts(at) and written[1].prompt not in texts(at)  # the oldest first
    shown = texts(at)
    a, b = shown[shown.index("A") + 1], shown[shown.index("B") + 1]
    assert {a, b} == {written[0].answer_stable, written[0].answer_candidate}
    at.button(key="canary-pair-0-A").click().run()
    assert not at.exception, at.exception
    assert written[1].prompt in texts(at)
    with sqlite3.connect(tmp_path / "votes.sqlite") as db:
        row = db.execute("SELECT turn_id, prompt, answer_a, revision_a, revision_b, repo_a, choice FROM votes").fetchone()
    winner = stable if a == written[0].answer_stable else candidate
    assert row == ("canary-pair-0", written[0].prompt, a, winner, ({stable, candidate} - {winner}).pop(),
                   "alice/reverse", "A")
    at.button(key="canary-pair-1-B").click().run()
    assert any("0 pair(s) sampled from canary traffic" in c.value for c in at.caption)
