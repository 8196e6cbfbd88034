"""`loradock lineage` and `loradock promote` on revisions whose metrics.json is written by the test
(the loop test in test_loop.py trains real ones): each rule that keeps a tag from moving, the tag's
message, and --force."""

import json
from pathlib import Path

import httpx2
import yaml

from tests.conftest import adapter_folder
from ui import votes

HELD_OUT = "a" * 64


def revision(run_cli, tmp_path: Path, repo: str, name: str, exact: float | None, parent: str | None = None,
             held_out: str = HELD_OUT, tag: str | None = None, figures: dict | None = None, graders: list = (),
             forgetting: float | None = None) -> str:
    """Push an adapter whose metrics.json says its parent's commit and its held-out exact match (or
    `figures`, made by `graders`)."""
    folder = adapter_folder(tmp_path / name, weights=name.encode() * 100)
    record = {"repo_id": repo, "revision": parent, "commit": parent, "base_model": "loradock/tiny-chat"} if parent else None
    (folder / "metrics.json").write_text(json.dumps({
        "objective": "dpo" if parent else "sft", "parent": record, "steps": 10, "method": "lora",
        "dataset_sha256": "d" * 64, "held_out_sha256": held_out, "graders": list(graders),
        "general": {"rows": 48, "base_perplexity": 10.0, "perplexity": 10.0 * (1 + forgetting), "forgetting": forgetting}
        if forgetting is not None else None,
        "eval_metrics": figures or ({"exact_match": exact, "rouge_l": 0.5} if exact is not None else None)}))
    (folder / "run_config.yaml").write_text(yaml.safe_dump({"parent": record, "objective": "dpo" if parent else "sft"}))
    pushed = run_cli("push", str(folder), repo, *(["--tag", tag] if tag else []))
    assert pushed.code == 0, pushed.text
    return pushed.out.split("commit ")[-1].strip()


def vote(database: Path, winner: str, loser: str, repo: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        votes.record(database, votes.Vote(
            session_id="s", turn_id=str(i), system="", prompt="p", answer_a="x", answer_b="y", choice="A",
            a=votes.Side(f"{repo}@{winner[:7]}", repo, winner), b=votes.Side(f"{repo}@{loser[:7]}", repo, loser)))


def tags(registry, repo: str) -> dict:
    refs = httpx2.get(f"{registry.url}/api/models/{repo}/refs", headers={"Authorization": f"Bearer {registry.write_token}"})
    return {t["name"]: t for t in refs.json()["tags"]}


def test_promote_moves_a_tag_only_with_the_evidence(run_cli, hub_env, tmp_path):
    repo, database = "alice/promoted", tmp_path / "votes.sqlite"
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="v1")
    worse = revision(run_cli, tmp_path, repo, "worse", 0.4, parent=v1)
    elsewhere = revision(run_cli, tmp_path, repo, "elsewhere", 0.9, parent=v1, held_out="b" * 64)
    unscored = revision(run_cli, tmp_path, repo, "unscored", None, parent=v1)
    better = revision(run_cli, tmp_path, repo, "better", 0.6, parent=v1)

    def promote(spec: str, *flags: str):
        return run_cli("promote", spec, "--tag", "prod", "--votes", str(database), *flags)

    for spec, words in [(f"{repo}@v1", "records no parent revision"),
                        (f"{repo}@{worse}", "held-out exact_match 0.400 is below its parent's 0.500"),
                        (f"{repo}@{elsewhere}", "were scored on different held-out data"),
                        (f"{repo}@{unscored}", "no held-out score of")]:
        refused = promote(spec)
        assert refused.code == 2 and words in refused.err and "no tag was moved" in refused.err, (spec, refused.err)
    assert "prod" not in tags(hub_env, repo)
    bad_tag = run_cli("promote", f"{repo}@{better}", "--tag", "refs/prod")
    assert bad_tag.code == 2 and "--tag 'refs/prod': invalid tag name" in bad_tag.err

    vote(database, v1, better, repo, 12)  # the voters prefer the parent: held-out scores are not enough
    vote(database, better, v1, repo, 4, start=12)
    refused = promote(f"{repo}@{better}")
    assert refused.code == 2 and "its win rate over its parent in the votes is 0.25" in refused.err
    vote(database, better, v1, repo, 30, start=16)
    moved = promote(f"{repo}@{better}")
    assert moved.code == 0, moved.text
    assert f"prod -> {better}" in moved.out and "win rate over its parent 0.74" in moved.out
    assert tags(hub_env, repo)["prod"]["targetCommit"] == better
    assert "held-out exact_match 0.600, parent 0.500" in tags(hub_env, repo)["prod"]["message"]
    assert "already at" in promote(f"{repo}@prod").out

    forced = promote(f"{repo}@{worse}", "--force")
    assert forced.code == 0, forced.text
    prod = tags(hub_env, repo)["prod"]
    assert prod["targetCommit"] == worse and "Forced with --force past: held-out exact_match 0.400" in prod["message"]
    # v1 has no parent; and it scores below... nothing: prod points at its child `worse`, so only the parent rule applies
    refused = promote(f"{repo}@v1")
    assert refused.code == 2 and tags(hub_env, repo)["prod"]["targetCommit"] == worse


def test_promote_refuses_a_revision_that_scores_below_the_tags_current_one(run_cli, hub_env, tmp_path):
    repo = "alice/downgrade"
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5)
    strong = revision(run_cli, tmp_path, repo, "strong", 0.9, parent=v1)
    weak = revision(run_cli, tmp_path, repo, "weak", 0.6, parent=v1)  # beats its parent, not what prod serves
    assert run_cli("promote", f"{repo}@{strong}", "--tag", "prod").code == 0
    refused = run_cli("promote", f"{repo}@{weak}", "--tag", "prod")
    assert refused.code == 2 and f"is below that of {repo}@{strong} (0.900), which prod points at now" in refused.err
    assert tags(hub_env, repo)["prod"]["targetCommit"] == strong


def test_lineage_follows_the_parents_to_the_base(run_cli, hub_env, tmp_path):
    repo, database = "alice/family", tmp_path / "votes.sqlite"
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="v1")
    v2 = revision(run_cli, tmp_path, repo, "v2", 0.6, parent=v1, tag="v2")
    v3 = revision(run_cli, tmp_path, repo, "v3", 0.7, parent=v2)
    vote(database, v3, v2, repo, 8)
    text = run_cli("lineage", f"{repo}@{v3}", "--votes", str(database))
    assert text.code == 0, text.text
    assert text.out.index(v3) < text.out.index(v2) < text.out.index(v1)
    assert "[v2]" in text.out and "exact match 0.700" in text.out and "votes vs parent 1.00" in text.out
    chain = json.loads(run_cli("lineage", f"{repo}@{v3}", "--votes", str(database), "--format", "json").out)
    assert [r["commit"] for r in chain] == [v3, v2, v1]
    assert [r["objective"] for r in chain] == ["dpo", "dpo", "sft"] and chain[2]["parent"] is None
    assert chain[0]["votes_vs_parent"]["votes"] == 8 and chain[1]["votes_vs_parent"] is None
    missing = run_cli("lineage", "alice/no-such-adapter@main")
    assert missing.code == 2 and "not found" in missing.err


def test_promote_compares_the_first_figure_child_and_parent_share_made_by_the_same_grader(run_cli, hub_env, tmp_path):
    """A GRPO child scored first by its reward is judged on the first figure its parent has too; a
    figure of the same name made by another grader (a changed Python module) is no evidence."""
    repo = "alice/graded"
    checker = {"name": "python:checks:ok", "grader": "python", "module": "checks", "function": "ok"}
    v1 = revision(run_cli, tmp_path, repo, "v1", None, tag="v1",
                  figures={"python:checks:ok": 0.4, "exact_match": 0.5}, graders=[{**checker, "sha256": "1" * 64}])
    grpo = revision(run_cli, tmp_path, repo, "grpo", None, parent=v1, figures={"regex:^a": 0.9, "exact_match": 0.6})
    moved = run_cli("promote", f"{repo}@{grpo}", "--tag", "prod", "--votes", str(tmp_path / "none.sqlite"))
    assert moved.code == 0 and "held-out exact_match 0.600, parent 0.500" in moved.out, moved.text

    changed = revision(run_cli, tmp_path, repo, "changed", None, parent=v1, figures={"python:checks:ok": 0.9},
                       graders=[{**checker, "sha256": "2" * 64}])
    refused = run_cli("promote", f"{repo}@{changed}", "--tag", "prod", "--votes", str(tmp_path / "none.sqlite"))
    assert refused.code == 2 and "were scored by different python:checks:ok graders" in refused.err, refused.text
    apart = revision(run_cli, tmp_path, repo, "apart", None, parent=v1, figures={"rouge_l": 0.9})
    refused = run_cli("promote", f"{repo}@{apart}", "--tag", "prod", "--votes", str(tmp_path / "none.sqlite"))
    assert refused.code == 2 and "share no held-out figure" in refused.err and "--grader" in refused.err, refused.text


def test_promote_holds_a_revision_to_the_forgetting_guard(run_cli, hub_env, tmp_path):
    repo, no_votes = "alice/forgetful", str(tmp_path / "none.sqlite")
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="v1", forgetting=0.05)
    forgetful = revision(run_cli, tmp_path, repo, "forgetful", 0.9, parent=v1, forgetting=0.4)
    refused = run_cli("promote", f"{repo}@{forgetful}", "--tag", "prod", "--votes", no_votes)
    assert refused.code == 2 and "general-ability perplexity is +40.0% against the base's, past --max-forgetting 0.25" \
        in refused.err, refused.text
    allowed = run_cli("promote", f"{repo}@{forgetful}", "--tag", "prod", "--votes", no_votes, "--max-forgetting", "0.5")
    assert allowed.code == 0 and "general-ability perplexity +40.0% against the base (--max-forgetting 0.5)" in allowed.out
    alone = revision(run_cli, tmp_path, repo, "alone", 0.9, forgetting=0.5)  # every reason is named
    refused = run_cli("promote", f"{repo}@{alone}", "--tag", "prod", "--votes", no_votes)
    assert refused.code == 2 and "+50.0% against the base's" in refused.err and "records no parent" in refused.err
    lineage = run_cli("lineage", f"{repo}@{forgetful}", "--votes", no_votes)
    assert "general-ability perplexity +40.0% against the base" in lineage.out and "+5.0%" in lineage.out
