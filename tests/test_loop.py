"""The whole loop on the shipped `reverse` task, as a user runs it: train v1 on a small budget (so it
is imperfect), serve it, answer held-out prompts with it, turn its wrong answers into votes in the
comparison screen's store (chosen: the correct answer, rejected: v1's), export and push them as a
registry dataset, preference-tune v2 from v1 on that dataset by its commit, push v2, serve both,
and check that v2 beats v1 through the endpoint, that v2's card names v1's commit and the
dataset's, that `loradock lineage` shows the chain, and that `loradock promote` moves `prod` to v2
and refuses to move it back to v1 without --force.

Prints v1's and v2's held-out exact match and the DPO run's time (the README quotes them)."""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ASSETS, ServeProcess, run_loradock, write_jsonl

pytestmark = pytest.mark.slow
REPO = "alice/loop-reverse"
VOTES_REPO = "alice/loop-votes"
# Every judging row is scored at each evaluation, so the held-out figures `promote` compares are
# those of the whole judging set, as `loradock eval` scores it through the endpoint.
LORA = ["--eval-generations", "50", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--max-length", "64",
        "--training.save_strategy", "no", "--training.disable_tqdm", "true"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers(url: str, model: str, prompts: list[str]) -> list[str]:
    def ask(prompt: str) -> str:
        reply = httpx2.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"].strip()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, prompts))


def exact_match(report: Path, model: str) -> float:
    return json.loads(report.read_text())["metrics"][model]["exact_match"]


def test_votes_on_v1_train_a_dpo_v2_that_beats_it_and_is_promoted(registry, base_model_dir, tmp_path):
    from ui import votes

    env = {**os.environ, "HF_ENDPOINT": registry.url, "HF_TOKEN": registry.write_token, "HF_HUB_DISABLE_XET": "1",
           "LORADOCK_CONFIG_DIR": str(tmp_path / "config")}

    def loradock(*args) -> str:
        result = run_loradock(*map(str, args), env=env, timeout=1800)
        assert result.returncode == 0, f"loradock {' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    held_out = rows(ASSETS / "tasks" / "reverse" / "heldout.jsonl")
    asked, judged = held_out[:50], held_out[50:]  # v1's mistakes on the first half teach v2; the second half judges
    judge = write_jsonl(tmp_path / "judge.jsonl", judged)
    # The judging rows as preference pairs, for DPO's held-out loss: the same prompts and references.
    judge_pairs = write_jsonl(tmp_path / "judge-pairs.jsonl", [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": " ".join(reversed(r["response"].split())) + " ."}
        for r in judged])

    # v1: instruction tuning on a small budget.
    loradock("train", "--data", ASSETS / "tasks" / "reverse" / "train.jsonl", "--eval-data", judge,
             "--output", tmp_path / "v1", "--lr", "2e-3", "--max-steps", "80", "--batch-size", "32",
             "--training.eval_steps", "80", *LORA)
    v1 = re.search(r"commit ([0-9a-f]{40})", loradock("push", tmp_path / "v1", REPO, "--tag", "v1")).group(1)

    server = ServeProcess(["--registry", registry.url, "--token", registry.write_token, "--max-lora-rank", "16",
                           "--max-model-len", "256"], tmp_path / "serve.log", env).start()
    try:
        # v1 answers the first half; each wrong answer becomes a vote for the correct one.
        prompts = [r["prompt"] for r in asked] + [r["prompt"] for r in rows(ASSETS / "tasks" / "reverse" / "train.jsonl")[:400]]
        references = [r["response"] for r in asked] + [r["response"] for r in rows(ASSETS / "tasks" / "reverse" / "train.jsonl")[:400]]
        given = answers(server.url, f"{REPO}@v1", prompts)
        database = tmp_path / "votes.sqlite"
        wrong = 0
        for i, (prompt, reference, answer) in enumerate(zip(prompts, references, given)):
            if answer.strip() != reference.strip():
                wrong += 1
                votes.record(database, votes.Vote(
                    session_id="loop", turn_id=str(i), system="", prompt=prompt, answer_a=reference, answer_b=answer,
                    choice="A", a=votes.Side("answer key"), b=votes.Side(f"{REPO}@v1", REPO, v1)))
        assert wrong >= 20, f"v1 got {len(prompts) - wrong} of {len(prompts)} right: too good to improve on here"

        exported = loradock("votes", "export", "--votes", database, "--adapter", REPO, "--revision", v1,
                            "--output", tmp_path / "export", "--push", VOTES_REPO)
        dataset_commit = re.search(r"^commit ([0-9a-f]{40})$", exported, re.M).group(1)

        # v2: preference tuning of v1, against v1, on the pushed votes by their commit.
        trained = loradock("train", "--objective", "dpo", "--init-adapter", f"{REPO}@v1",
                           "--data", f"datasets/{VOTES_REPO}@{dataset_commit}/preferences.jsonl",
                           "--eval-data", judge_pairs, "--output", tmp_path / "v2", "--lr", "2e-3",
                           "--max-steps", "200", "--batch-size", "16", "--training.beta", "0.1",
                           # DPO with an NLL term on the chosen answers (RPO): plain DPO lowers the
                           # likelihood of both answers on a model this small, and its greedy answers with it.
                           "--training.loss_type", "sigmoid,sft", "--training.eval_steps", "200", *LORA)
        v2 = re.search(r"commit ([0-9a-f]{40})", loradock("push", tmp_path / "v2", REPO, "--tag", "v2")).group(1)

        report, graders = tmp_path / "eval.json", tmp_path / "loop_graders.py"
        graders.write_text("def first_word(answer, reference):\n"
                           "    return float(answer.split()[:1] == reference.split()[:1])\n")
        loradock("eval", "--base-url", f"{server.url}/v1", "--model", f"{REPO}@v1", "--model", f"{REPO}@v2",
                 "--data", judge, "--output", report, "--grader", "exact_match", "--grader",
                 f"python:{graders}:first_word")
        before, after = exact_match(report, f"{REPO}@v1"), exact_match(report, f"{REPO}@v2")
        for model, figures in json.loads(report.read_text())["metrics"].items():  # an exact answer has its first word
            assert figures[f"python:{graders}:first_word"] >= figures["exact_match"], (model, figures)
        dpo = json.loads((tmp_path / "v2" / "metrics.json").read_text())
        print(f"\nloop: {wrong} votes from v1's wrong answers; held-out exact match through the endpoint: "
              f"v1 {before:.3f} -> v2 {after:.3f}; DPO run {dpo['train_runtime_s']} s ({dpo['steps']} steps)")
        assert after > before, trained
    finally:
        server.stop()

    card = httpx2.get(f"{registry.url}/{REPO}/resolve/{v2}/README.md",
                      headers={"Authorization": f"Bearer {registry.write_token}"}).text
    assert v1 in card and dataset_commit in card and "dpo" in card

    lineage = loradock("lineage", f"{REPO}@v2", "--votes", database)
    assert lineage.index(v2) < lineage.index(v1) and "dpo" in lineage and "sft" in lineage
    assert f"datasets/{VOTES_REPO}@{dataset_commit[:12]}" in lineage
    chain = json.loads(loradock("lineage", f"{REPO}@v2", "--votes", database, "--format", "json"))
    assert [r["commit"] for r in chain] == [v2, v1] and chain[0]["parent"]["commit"] == v1
    assert chain[0]["dataset"]["commit"] == dataset_commit and chain[1]["parent"] is None

    promoted = loradock("promote", f"{REPO}@v2", "--tag", "prod")
    assert f"prod -> {v2}" in promoted
    refused = run_loradock("promote", f"{REPO}@v1", "--tag", "prod", env=env)
    assert refused.returncode == 2 and "not moving prod" in refused.stderr and "--force" in refused.stderr
    tags = {t["name"]: t for t in httpx2.get(f"{registry.url}/api/models/{REPO}/refs",
                                               headers={"Authorization": f"Bearer {registry.write_token}"}).json()["tags"]}
    assert tags["prod"]["targetCommit"] == v2  # the refusal moved nothing
    forced = loradock("promote", f"{REPO}@v1", "--tag", "prod", "--force")
    tags = {t["name"]: t for t in httpx2.get(f"{registry.url}/api/models/{REPO}/refs",
                                               headers={"Authorization": f"Bearer {registry.write_token}"}).json()["tags"]}
    assert tags["prod"]["targetCommit"] == v1 and "Forced with --force" in tags["prod"]["message"], forced
