"""loradock ui [--base-url http://127.0.0.1:8000/v1] [--registry URL] [--port 8501]

The comparison screen (a Streamlit script; `loradock ui` runs it and hands its settings over in
the environment). The same conversation goes to the base model and to one to three adapters
through the OpenAI-compatible endpoint; each model keeps its own history and the answers stream
side by side, with their timings. Blind A/B mode puts any two of them (the base, an adapter, another
revision of it) as A and B in random order, hides which answer is whose, and stores each vote with
both sides' repo and commit in SQLite (ui/votes.py); the Votes tab rates them (ui/ratings.py). The
registry supplies hot-loadable adapters, by name and by tag, and their cards (ui/registry.py). The
Canary tab puts the blind pairs `loradock serve` sampled from a canary's traffic to the vote
(`loradock.pairs`).

Everything a browser session has (its conversation, its id for votes) lives in st.session_state.
The endpoint and the registry come from the launch settings only and are shown read-only: the
serving key (LORADOCK_API_KEY) and the Hub token go to them and nowhere a visitor could name.
Started with a password (LORADOCK_UI_PASSWORD), a session sees the sign-in form and nothing else,
and asks nothing of the endpoint or the registry, until it has typed it.
"""

import hashlib
import hmac
import os
import queue
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import streamlit as st

from hub.adapter import AdapterRef
from loradock import pairs as canary
from loradock.errors import LoradockError, NotFound, Unreachable
from ui import API_KEY_ENV, ENDPOINT_ENV, PAIRS_ENV, PASSWORD_ENV, REGISTRY_ENV, VOTES_ENV, ratings, view, votes
from ui.client import Answer, Endpoint, EndpointDown, Sampling

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"
MAX_ADAPTERS = 3


@dataclass
class Choice:
    """What the sidebar picked: where to ask, whom, and how."""
    endpoint: Endpoint
    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    system: str = ""
    blind: bool = False
    pair: tuple[str, str] | None = None  # blind A/B's two models (None: no two different ones yet)
    sources: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # model -> (repo id, commit)


def endpoint_url() -> str:
    """The endpoint `loradock ui --base-url` was started with: the only place the serving key goes."""
    return os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT)


def registry_url() -> str:
    """The registry `loradock ui --registry` was started with: the only place the Hub token goes."""
    from hub.client import endpoint_url

    return endpoint_url(os.environ.get(REGISTRY_ENV))


def votes_path() -> Path:
    return Path(os.environ.get(VOTES_ENV) or votes.default_path())


@st.cache_data(ttl=30, show_spinner=False)
def registry_adapters(base: str, registry: str) -> tuple[list[tuple[str, str]], str | None]:
    """([(name, commit)], the problem when the registry cannot be read): a failure is cached too, for 30 s."""
    from hub.client import registry as door
    from ui.registry import hot_loadable

    try:
        return [(a.name, a.commit) for a in hot_loadable(base, door(registry))], None
    except Unreachable as e:
        return [], f"registry unreachable: {e.problem} ({e.fix})"
    except LoradockError as e:  # it answered, and refused (a token, offline mode): say what to change
        return [], f"registry: {e.problem} ({e.fix})"


@st.cache_data(show_spinner=False)  # pinned to a commit: it never changes
def adapter_card(repo_id: str, commit: str, registry: str):
    from hub.client import registry as door
    from ui.registry import adapter_card as read_card

    return read_card(repo_id, commit, door(registry))


def sidebar(state) -> Choice:
    bar = st.sidebar
    bar.title("loradock compare")
    url = endpoint_url()
    bar.text(f"Endpoint: {url}\nRegistry: {registry_url()}")  # read-only: set with `loradock ui --base-url/--registry`
    choice = Choice(Endpoint(url, api_key=os.environ.get(API_KEY_ENV)))
    try:
        state.cards = choice.endpoint.models()
        bar.success(f"endpoint up: {len(state.cards)} model(s)")
    except EndpointDown as e:  # keep the last models seen, so the selection survives; retried on every rerun
        bar.error("endpoint down")
        st.error(view.escape_markdown(f"The endpoint is not answering: {e}. Start it with `loradock serve`, or restart "
                                      "this screen with `loradock ui --base-url URL`; your next message tries again."))
    cards = state.get("cards", [])
    bases = [c.id for c in cards if not c.parent]
    choice.base = bar.selectbox("Base model", bases, help="the model every adapter is compared with")
    for c in listed_adapters(cards):
        choice.sources[c.id] = (c.loradock.get("repo_id"), c.commit)
    served = set(choice.sources)
    if choice.base:
        options, problem = registry_adapters(choice.base, registry_url())
        for name, commit in options:
            choice.sources.setdefault(name, (AdapterRef.of(name).repo_id, commit))
        if problem:
            bar.warning(view.escape_markdown(problem))

    def label(name: str) -> str:
        if name not in choice.sources:
            return f"{name} (base model)"
        commit = choice.sources[name][1]
        where = "served" if name in served else "registry, loads on first use"
        return f"{name} · {commit[:7] if commit else 'no sha'} ({where})"

    default = [c.id for c in listed_adapters(cards)][:1]  # the server's first adapter (a set's order varies by run)
    choice.adapters = bar.multiselect(f"Adapters (1 to {MAX_ADAPTERS})", list(choice.sources), default=default,
                                      format_func=label, max_selections=MAX_ADAPTERS)
    choice.blind = bar.toggle("Blind A/B", help="two of the models, as A and B in random order: the base, an adapter, "
                                                "another revision of it; vote on each turn (the Votes tab rates them)")
    if choice.blind:
        choice.pair = blind_pair(bar, choice, label)
    bar.subheader("Sampling (every column)")
    choice.sampling = Sampling(
        temperature=bar.slider("Temperature", 0.0, 2.0, 0.0, 0.05), top_p=bar.slider("Top p", 0.05, 1.0, 1.0, 0.05),
        max_tokens=int(bar.number_input("Max tokens", 1, 4096, 128)), seed=int(bar.number_input("Seed", 0, 2**31 - 1, 0)))
    choice.system = bar.text_area("System prompt", "", help="sent first to every model")
    return choice


def listed_adapters(cards: list) -> list:
    """The adapters the endpoint serves, each once: a commit `loradock serve` holds for a tag or
    branch it follows (`org/name@<sha>` beside `org/name@prod`) is offered under the name only."""
    adapters = [c for c in cards if c.parent]
    followed = {(c.loradock.get("repo_id"), c.commit) for c in adapters if c.loradock.get("follows")}
    return [c for c in adapters
            if not ((c.loradock.get("repo_id"), c.commit) in followed and c.id == f"{c.loradock.get('repo_id')}@{c.commit}")]


def blind_pair(bar, choice: Choice, label) -> tuple[str, str] | None:
    """The two models blind A/B compares, picked from the base and every adapter and tag (first the
    first adapter picked above, then the base); None while they are not two different models."""
    models = [choice.base, *choice.sources] if choice.base else list(choice.sources)
    if not models:
        return None
    first = models.index(choice.adapters[0]) if choice.adapters and choice.adapters[0] in models else len(models) - 1
    pair = (bar.selectbox("Blind A/B: compare", models, index=first, format_func=label, key="blind-first"),
            bar.selectbox("with", models, index=0, format_func=label, key="blind-second",
                          help="e.g. alice/reverse@v2 with alice/reverse@v1, or an adapter with its base model"))
    if pair[0] == pair[1]:
        bar.warning("Blind A/B needs two different models: pick another one to compare with")
        return None
    return pair


def new_turn(state, choice: Choice, user: str) -> dict:
    blind = choice.blind and choice.pair is not None
    models = list(choice.pair) if blind else [choice.base, *choice.adapters[:MAX_ADAPTERS]]
    if blind:
        random.shuffle(models)
    return {"id": uuid.uuid4().hex, "user": user, "system": choice.system, "base": choice.base, "order": models,
            "blind": blind, "answers": {}, "vote": None, "sources": {m: choice.sources.get(m, (None, None)) for m in models},
            "histories": {m: history(state.turns, m, choice.system, user) for m in models}}


def history(turns: list[dict], model: str, system: str, user: str) -> list[dict]:
    """This model's own conversation: the turns it answered (a failed answer drops its turn), then `user`."""
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        answer = turn["answers"].get(model)
        if answer and not answer.error:
            messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": answer.text}]
    return messages + [{"role": "user", "content": user}]


def stream_answers(endpoint: Endpoint, sampling: Sampling, turn: dict, slots: dict) -> dict[str, Answer]:
    """Ask every model at once; the script thread draws what the worker threads receive.

    st.write_stream would render markdown and drain one stream at a time, so the columns would
    neither be plain text nor stream in parallel: the columns are st.empty slots redrawn here.
    """
    events = queue.SimpleQueue()  # (model, text chunk | finished Answer)

    def work(model: str) -> None:
        try:
            stream = endpoint.stream_chat(model, turn["histories"][model], sampling)
            while True:
                events.put((model, next(stream)))
        except StopIteration as done:
            events.put((model, done.value))
        except Exception as e:  # noqa: BLE001 - a bug must not leave the column waiting forever
            events.put((model, Answer(model, error=f"{type(e).__name__}: {e}")))

    answers, texts = {}, dict.fromkeys(slots, "")
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        for model in slots:
            pool.submit(work, model)
        while len(answers) < len(slots):
            try:
                batch = [events.get(timeout=0.5)]
                while not events.empty():
                    batch.append(events.get_nowait())
            except queue.Empty:
                continue
            for model, item in batch:
                if isinstance(item, Answer):
                    answers[model] = item
                else:
                    texts[model] += item
            for model in {m for m, item in batch if isinstance(item, str)} - answers.keys():
                slots[model].text(texts[model] + " ▌")
    return answers


def labels(turn: dict, sources: dict) -> dict[str, str]:
    def named(model: str) -> str:
        commit = (turn.get("commits") or {}).get(model) or (sources.get(model) or (None, None))[1]
        return f"{model} · {commit[:7]}" if commit else model

    if not turn["blind"]:
        return {m: named(m) for m in turn["order"]}
    return {m: f"{side}: {named(m)}" if turn["vote"] else side for side, m in zip("AB", turn["order"])}


def show_turn(turn: dict, choice: Choice, state) -> None:
    """One user message and every model's answer; a turn without answers yet is asked now."""
    with st.chat_message("user"):
        st.text(turn["user"])
    with st.chat_message("assistant"):
        names = labels(turn, choice.sources)
        slots = {}
        for column, model in zip(st.columns(len(turn["order"])), turn["order"]):
            column.text(names[model])
            slots[model] = column.empty()
        if not turn["answers"]:
            turn["answers"] = stream_answers(choice.endpoint, choice.sampling, turn, slots)
            turn["commits"] = {**served_commits(choice.endpoint, turn["order"]),
                               **{m: a.commit for m, a in turn["answers"].items() if a.commit}}
            state.turns.append(turn)
        for model, slot in slots.items():
            view.answer(slot, turn["answers"][model])
        if turn["blind"]:
            vote_row(turn, state)
        prompt_panel(turn, choice.endpoint, names)


def served_commits(endpoint: Endpoint, models: list[str]) -> dict[str, str | None]:
    """The commit each adapter was served from (a hot-loaded one is listed once it has answered)."""
    try:
        cards = {c.id: c for c in endpoint.models()}
    except EndpointDown:
        return {}
    return {m: cards[m].commit for m in models if m in cards and cards[m].parent}


def vote_row(turn: dict, state) -> None:
    answers = [turn["answers"][m] for m in turn["order"]]
    if any(a.error for a in answers):
        st.caption("no vote on this turn: an answer failed")
        return
    if turn["vote"]:
        st.caption(f"your vote: {view.VOTE_LABELS[turn['vote']]}")
        return
    for column, (vote, text) in zip(st.columns(len(view.VOTE_LABELS)), view.VOTE_LABELS.items()):
        if column.button(text, key=f"vote-{turn['id']}-{vote}"):
            a, b = (voted_side(turn, m) for m in turn["order"])
            votes.record(votes_path(), votes.Vote(
                session_id=state.session_id, turn_id=turn["id"], system=turn["system"], prompt=turn["user"],
                answer_a=answers[0].text, answer_b=answers[1].text, choice=vote, a=a, b=b))
            turn["vote"] = vote
            st.rerun()


def voted_side(turn: dict, model: str) -> votes.Side:
    """A side as the vote records it: its repo, and the commit the endpoint served it from (the
    registry's listing when the endpoint did not say; the name for a model with neither)."""
    repo, listed = turn["sources"].get(model, (None, None))
    return votes.Side(model, repo or "", (turn.get("commits") or {}).get(model) or listed or "")


def prompt_panel(turn: dict, endpoint: Endpoint, names: dict) -> None:
    """The exact prompt each model read, from the token ids the server reported (hidden until the vote)."""
    if (turn["blind"] and not turn["vote"]) or not st.toggle("Show prompt", key=f"prompt-{turn['id']}"):
        return
    rendered = turn.setdefault("prompts", {})
    for model in turn["order"]:
        ids = turn["answers"][model].prompt_token_ids
        if model not in rendered and ids:
            try:
                rendered[model] = endpoint.rendered_prompt(model, ids)
            except httpx2.HTTPError as e:
                st.warning(view.escape_markdown(f"cannot render the prompt of {model}: {e}"))
    view.prompts({m: rendered[m] for m in turn["order"] if m in rendered}, turn["base"], names)


def cards_tab(choice: Choice) -> None:
    if not choice.adapters:
        st.caption("pick an adapter in the sidebar to see what the registry knows about it")
    for name in choice.adapters:
        st.subheader(view.escape_markdown(name))
        repo_id, commit = choice.sources.get(name, (None, None))
        if not (repo_id and commit):
            st.caption("served from a local folder: the registry has no card for it")
            continue
        try:
            view.card(adapter_card(repo_id, commit, registry_url()))
        except NotFound as e:
            st.warning(view.escape_markdown(f"no card: {repo_id}@{commit[:12]} is not in the registry ({e.problem})"))
        except LoradockError as e:
            st.warning(view.escape_markdown(f"{e.problem} ({e.fix})"))


@st.cache_data(show_spinner=False, max_entries=8)  # the same votes, the same intervals (a fixed seed)
def rated(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return ratings.pairs(rows), ratings.bradley_terry(rows)


def votes_tab(state) -> None:
    path = votes_path()
    st.caption(f"every session's votes, per revision ({len(votes.session_votes(path, state.session_id))} from this "
               "session); `loradock votes report` prints the same")
    pair_rows, ranking = rated(votes.outcomes(path))
    view.pairs(pair_rows)
    view.ranking(ranking)
    if st.button("Export", help="write the votes as a preference dataset and the preferred answers as an SFT dataset "
                                "(`loradock votes export` can pick an adapter or a revision, and push them)"):
        try:
            preferences, sft, rows = votes.export(path, path.parent / "exports" / time.strftime("%Y%m%d-%H%M%S"))
        except LoradockError as e:
            st.warning(view.escape_markdown(f"{e.problem} ({e.fix})"))
            return
        st.success(view.escape_markdown(f"{rows} rows: {preferences} (prompt, chosen, rejected) and {sft} "
                                        "(prompt, response; check it with `loradock data check`)"))
        for target in (preferences, sft):
            st.download_button(target.name, target.read_bytes(), file_name=target.name, mime="application/jsonl")


def pairs_path() -> Path:
    return Path(os.environ.get(PAIRS_ENV) or canary.folder())


def canary_tab(state) -> None:
    """The blind pairs `loradock serve` sampled from canary traffic, one at a time, oldest first:
    the same conversation answered by a tag's stable commit and by its candidate, as A and B in an
    order drawn per session and pair. A vote lands in the votes store with both commits, where
    `loradock rollout status` weighs it."""
    path = votes_path()
    voted = {row["turn_id"] for row in votes.session_votes(path, state.session_id)}
    waiting = [pair for pair in canary.read(pairs_path()) if f"canary-{pair.id}" not in voted]
    st.caption(f"{len(waiting)} pair(s) sampled from canary traffic ({pairs_path()}) wait for your vote; "
               "`loradock serve --canary-pairs PERCENT` samples them while `loradock promote --canary` runs")
    if not waiting:
        return
    pair = waiting[0]
    sides = [("stable", pair.stable, pair.answer_stable), ("candidate", pair.candidate, pair.answer_candidate)]
    if int(hashlib.sha256(f"{state.session_id}{pair.id}".encode()).hexdigest(), 16) % 2:
        sides.reverse()
    st.markdown(view.escape_markdown(f"{pair.repo_id}@{pair.tag}: which answer is better?"))
    if pair.system:
        st.caption(view.escape_markdown(f"system: {pair.system}"))
    with st.chat_message("user"):
        st.text(pair.prompt)
    for column, label, (_, _, text) in zip(st.columns(2), "AB", sides):
        column.text(label)
        column.text(text)
    for column, (vote, text) in zip(st.columns(len(view.VOTE_LABELS)), view.VOTE_LABELS.items()):
        if column.button(text, key=f"canary-{pair.id}-{vote}"):
            a, b = (votes.Side(f"{pair.repo_id}@{commit}", pair.repo_id, commit) for _, commit, _ in sides)
            votes.record(path, votes.Vote(session_id=state.session_id, turn_id=f"canary-{pair.id}", system=pair.system,
                                          prompt=pair.prompt, answer_a=sides[0][2], answer_b=sides[1][2], choice=vote,
                                          a=a, b=b))
            st.rerun()


def signed_in(state) -> bool:
    """Whether this browser session may use the screen: always when `loradock ui` has no password;
    otherwise once the session has typed it (compared in constant time). Until then only the
    sign-in form is drawn."""
    expected = os.environ.get(PASSWORD_ENV)
    if not expected or state.get("signed_in"):
        return True
    st.title("loradock compare")
    with st.form("sign-in", clear_on_submit=True):
        typed = st.text_input("Password", type="password",
                              help="the password `loradock ui` was started with (--password or LORADOCK_UI_PASSWORD)")
        submitted = st.form_submit_button("Open")
    if submitted:
        if hmac.compare_digest(typed.encode(), expected.encode()):
            state.signed_in = True
            st.rerun()
        st.error("wrong password: type the one `loradock ui` was started with (ask whoever started it)")
    return False


def main() -> None:
    st.set_page_config(page_title="loradock compare", layout="wide")
    state = st.session_state
    if not signed_in(state):
        return
    state.setdefault("session_id", uuid.uuid4().hex)
    state.setdefault("turns", [])
    choice = sidebar(state)
    chat, cards, ballots, canaries = st.tabs(["Chat", "Adapter cards", "Votes", "Canary"])
    prompt = st.chat_input("Message every model")
    with chat:
        if choice.pair:
            st.caption("Blind A/B: the two models picked in the sidebar, as A and B in random order")
        for turn in list(state.turns):
            show_turn(turn, choice, state)
        if prompt and not choice.base:
            st.error("No model to ask: the endpoint lists none yet. Check that it is up, then send again.")
        elif prompt:
            show_turn(new_turn(state, choice, prompt), choice, state)
    with cards:
        cards_tab(choice)
    with ballots:
        votes_tab(state)
    with canaries:
        canary_tab(state)


main()
