"""The registry through real clients: loradock's CLI, huggingface_hub's HfApi and downloads, the `hf` CLI.

Every test talks to `loradock hub serve` running in its own process on 127.0.0.1.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from tests.conftest import REPO, adapter_folder


def api_for(registry, token):
    from hub.client import hub_api

    return hub_api(registry.url, token)


def test_push_list_pull_by_branch_tag_and_sha(run_cli, hub_env, tmp_path):
    folder = adapter_folder(tmp_path / "adapter", weights=os.urandom(2 << 20))
    first = run_cli("push", folder, "alice/flow", "--tag", "v1", "--message", "first version")
    assert first.code == 0, first.text
    sha_v1 = first.out.split("commit ")[1].split()[0]
    assert len(sha_v1) == 40

    (folder / "adapter_model.safetensors").write_bytes(os.urandom(2 << 20))
    second = run_cli("push", folder, "alice/flow", "--tag", "v2")
    sha_v2 = second.out.split("commit ")[1].split()[0]
    assert second.code == 0 and sha_v2 != sha_v1

    listed = run_cli("list", "--base-model", "loradock/tiny-chat", "--search", "flow")
    assert listed.code == 0 and "alice/flow" in listed.out and sha_v2[:12] in listed.out and "v1,v2" in listed.out
    header, row = listed.out.splitlines()[:2]
    assert header.split()[:4] == ["adapter", "base", "model", "method"] and row.split()[2:4] == ["lora", "8"]

    for revision, expected in [("main", sha_v2), ("v1", sha_v1), (sha_v1, sha_v1)]:
        to = tmp_path / f"pulled-{revision[:8]}"
        pulled = run_cli("pull", f"alice/flow@{revision}", "--to", to)
        assert pulled.code == 0, pulled.text
        assert f"is commit {expected}" in pulled.out
        assert json.loads((to / ".loradock-pull.json").read_text())["commit"] == expected
    assert (tmp_path / "pulled-v1" / "adapter_model.safetensors").read_bytes() != (folder / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "pulled-main" / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_model_card_front_matter_is_what_the_hub_reads(run_cli, hub_env, tmp_path):
    from huggingface_hub import hf_hub_download

    folder = adapter_folder(tmp_path / "adapter")
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 0.25, "dataset_sha256": "ab" * 32,
                                                     "base_model_revision": "cd" * 32}))
    (folder / "run_config.yaml").write_text(yaml.safe_dump({"data": "tasks/train.jsonl", "training": {"learning_rate": 0.002}}))
    assert run_cli("push", folder, "alice/carded").code == 0
    info = api_for(hub_env, hub_env.write_token).model_info("alice/carded")
    card = info.card_data.to_dict()
    assert card["base_model"] == "loradock/tiny-chat" and card["library_name"] == "peft"
    assert card["datasets"] == ["train.jsonl"] and card["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.25
    assert card["loradock"]["dataset_sha256"] == "ab" * 32 and card["loradock"]["base_model_revision"] == "cd" * 32
    assert card["loradock"]["lora"] == {"r": 8, "alpha": 16, "dropout": None, "target_modules": ["q_proj"]}
    assert card["loradock"]["training"] == {"learning_rate": 0.002} and card["loradock"]["chat_template"] == "{{ messages }}"
    assert "base_model:adapter:loradock/tiny-chat" in info.tags
    text = open(hf_hub_download("alice/carded", "README.md", endpoint=hub_env.url, token=hub_env.write_token)).read()
    assert "client.chat.completions.create" in text and "PeftModel.from_pretrained" in text
    assert hub_env.write_token not in text and str(tmp_path) not in text


def test_huggingface_hub_downloads_by_tag_and_sha(run_cli, hub_env, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    weights = os.urandom(3 << 20)
    push = run_cli("push", adapter_folder(tmp_path / "a", weights), "alice/downloads", "--tag", "v1")
    sha = push.out.split("commit ")[1].split()[0]
    path = hf_hub_download("alice/downloads", "adapter_model.safetensors", revision="v1", endpoint=hub_env.url,
                           token=hub_env.write_token, cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == weights and f"snapshots/{sha}/" in path
    snapshot = snapshot_download("alice/downloads", revision=sha, endpoint=hub_env.url, token=hub_env.write_token,
                                 cache_dir=tmp_path / "cache2")
    assert sorted(os.listdir(snapshot)) == [".gitattributes", "README.md", "adapter_config.json",
                                            "adapter_model.safetensors", "chat_template.jinja"]


def test_range_and_head_requests(run_cli, hub_env, tmp_path):
    import httpx2

    weights = os.urandom(1 << 20)
    run_cli("push", adapter_folder(tmp_path / "a", weights), "alice/ranges")
    url = f"{hub_env.url}/alice/ranges/resolve/main/adapter_model.safetensors"
    head = httpx2.head(url)
    assert head.status_code == 200 and head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["X-Linked-Etag"].strip('"') == hashlib.sha256(weights).hexdigest() and len(head.headers["X-Repo-Commit"]) == 40
    part = httpx2.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == weights[100:200]


def test_the_hf_cli_downloads_from_the_registry(run_cli, hub_env, tmp_path):
    run_cli("push", adapter_folder(tmp_path / "a"), "alice/viacli", "--tag", "v1")
    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    result = subprocess.run([hf, "download", "alice/viacli", "adapter_config.json", "--revision", "v1",
                             "--local-dir", str(tmp_path / "out")],
                            env={**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8


def test_racing_pushes_on_one_parent(hub_env, tmp_path):
    """Two commits on the same parent: one lands, the other gets 412, and the repo is consistent."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = api_for(hub_env, hub_env.write_token)
    api.create_repo("alice/race")
    parent = api.model_info("alice/race").sha
    barrier, outcomes = threading.Barrier(2), {}

    def push(name: str) -> None:
        operation = CommitOperationAdd(path_in_repo=f"{name}.txt", path_or_fileobj=name.encode())
        barrier.wait()
        try:
            outcomes[name] = api.create_commit("alice/race", [operation], commit_message=name, parent_commit=parent).oid
        except HfHubHTTPError as e:
            outcomes[name] = e.response.status_code

    threads = [threading.Thread(target=push, args=(name,)) for name in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {name: oid for name, oid in outcomes.items() if isinstance(oid, str)}
    assert len(winners) == 1 and [v for v in outcomes.values() if not isinstance(v, str)] == [412], outcomes
    (winner, oid), = winners.items()
    assert api.model_info("alice/race").sha == oid
    assert sorted(api.list_repo_files("alice/race")) == [".gitattributes", f"{winner}.txt"]
    assert [c.commit_id for c in api.list_repo_commits("alice/race")][:2] == [oid, parent]


def test_private_repo_access_matrix(run_cli, hub_env, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    assert run_cli("push", adapter_folder(tmp_path / "a"), "alice/secret", "--private").code == 0
    writer, reader = api_for(hub_env, hub_env.write_token), api_for(hub_env, hub_env.read_token)
    anonymous, stranger = api_for(hub_env, None), api_for(hub_env, "hf_not_a_token_of_this_registry")

    assert writer.model_info("alice/secret").private is True
    assert reader.model_info("alice/secret").sha == writer.model_info("alice/secret").sha
    assert "alice/secret" in [m.id for m in reader.list_models(search="secret")]
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/secret")
    assert "alice/secret" not in [m.id for m in anonymous.list_models(search="secret")]
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "adapter_config.json", endpoint=hub_env.url, token=False, cache_dir=tmp_path / "c")
    for who in (stranger,):
        with pytest.raises(HfHubHTTPError) as e:
            who.model_info("alice/secret")
        assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        reader.create_repo("reader/mine")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        anonymous.create_repo("alice/anon")
    assert e.value.response.status_code == 401
    refused = run_cli("push", adapter_folder(tmp_path / "b"), "alice/secret", "--token", hub_env.read_token)
    assert refused.code == 2 and "use a write token" in refused.err and hub_env.read_token not in refused.text


def test_tokens_never_reach_logs_errors_or_cards(run_cli, hub_env, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    # Its own traffic, whatever ran before: a push with each token (one refused), an unknown token, a card.
    assert run_cli("push", adapter_folder(tmp_path / "a", os.urandom(1 << 16)), "alice/tokenless").code == 0
    refused = run_cli("push", adapter_folder(tmp_path / "b"), "alice/tokenless", "--token", hub_env.read_token)
    assert refused.code == 2 and hub_env.read_token not in refused.text and hub_env.write_token not in refused.text
    with pytest.raises(HfHubHTTPError) as unknown:
        api_for(hub_env, "hf_not_a_token_of_this_registry").model_info("alice/tokenless")
    assert unknown.value.response.status_code == 401
    card = open(hf_hub_download("alice/tokenless", "README.md", endpoint=hub_env.url, token=hub_env.write_token,
                                cache_dir=tmp_path / "cache")).read()
    assert hub_env.write_token not in card and hub_env.read_token not in card
    log = hub_env.log.read_text()
    assert hub_env.write_token not in log and hub_env.read_token not in log
    for path in hub_env.root.rglob("*"):
        if path.is_file():  # the database keeps only sha256 hashes of tokens
            assert hub_env.write_token.encode() not in path.read_bytes(), path
            assert hub_env.read_token.encode() not in path.read_bytes(), path


def test_login_stores_a_checked_token_for_the_endpoint_and_logout_forgets_it(run_cli, hub_env, monkeypatch, tmp_path):
    from hub.client import credentials_path

    monkeypatch.delenv("HF_TOKEN")
    bad = run_cli("hub", "login", "--token", "hf_wrong")
    assert bad.code == 2 and "refused" in bad.err and "hf_wrong" not in bad.text and not credentials_path().exists()
    good = run_cli("hub", "login", "--token", hub_env.write_token)
    assert good.code == 0 and f"logged in to {hub_env.url} as alice" in good.out
    assert oct(credentials_path().stat().st_mode & 0o777) == "0o600"
    assert run_cli("push", adapter_folder(tmp_path / "a"), "alice/afterlogin").code == 0  # uses the stored token
    assert run_cli("hub", "logout").code == 0
    assert "refused" in run_cli("push", adapter_folder(tmp_path / "b"), "alice/afterlogout").err


@pytest.mark.network
def test_list_adapters_on_huggingface_co(run_cli):
    result = run_cli("list", "--registry", "https://huggingface.co", "--base-model", "Qwen/Qwen2.5-0.5B-Instruct",
                     "--search", "lora")
    assert result.code == 0 and "Qwen/Qwen2.5-0.5B-Instruct" in result.out


def test_vllms_own_hub_lora_resolver_works_against_the_registry(run_cli, hub_env, tmp_path):
    """vLLM's built-in HfHubResolver, unchanged, in a process that sees HF_ENDPOINT from the start (as vLLM does)."""
    assert run_cli("push", adapter_folder(tmp_path / "a"), "alice/resolvable").code == 0
    script = (
        "import asyncio\n"
        "from vllm.plugins.lora_resolvers.hf_hub_resolver import HfHubResolver\n"
        "request = asyncio.run(HfHubResolver(['alice/resolvable']).resolve_lora('loradock/tiny-chat', 'alice/resolvable'))\n"
        "print(request.lora_name, request.lora_path)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    name, path = result.stdout.split()[-2:]
    assert name == "alice/resolvable" and json.loads(open(os.path.join(path, "adapter_config.json")).read())["r"] == 8


def test_deleting_a_file_and_a_folder(hub_env):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api = api_for(hub_env, hub_env.write_token)
    api.create_repo("alice/deletes")
    files = ["keep.txt", "gone.txt", "dir/a.txt", "dir/b.txt", "dir2/c.txt"]
    api.create_commit("alice/deletes", [CommitOperationAdd(f, f.encode()) for f in files], commit_message="add")
    api.create_commit("alice/deletes", [CommitOperationDelete("gone.txt"), CommitOperationDelete("dir/", is_folder=True)],
                      commit_message="delete")
    assert sorted(api.list_repo_files("alice/deletes")) == [".gitattributes", "dir2/c.txt", "keep.txt"]


def test_the_base_model_can_be_pushed_and_pulled_back(cli, hub_env, base_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pushed = cli("push", "--model", base_model_dir, "loradock/tiny-chat")
    assert pushed.code == 0, pushed.text
    sha = pushed.out.split("commit ")[1].split()[0]
    pulled = cli("pull", f"loradock/tiny-chat@{sha}", "--to", tmp_path / "base")
    assert pulled.code == 0, pulled.text
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == (base_model_dir / "model.safetensors").read_bytes()
    AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert AutoTokenizer.from_pretrained(tmp_path / "base").eos_token == "<|end|>"
    refused = cli("push", "--model", tmp_path / "base" / "..", "loradock/nope")
    assert refused.code == 2 and "is not a model folder: there is no config.json" in refused.err


def test_pagination_links_are_absolute_and_keep_every_filter(run_cli, hub_env, tmp_path):
    import httpx2

    for name in ("alice/page-a", "alice/page-b"):
        assert run_cli("push", adapter_folder(tmp_path / name.split("/")[1]), name).code == 0
    url = f"{hub_env.url}/api/models?search=page-&filter=peft&filter=base_model:loradock/tiny-chat&limit=1"
    seen = []
    while url:
        response = httpx2.get(url)
        seen += [m["id"] for m in response.json()]
        link = response.headers.get("Link")
        url = link.split(">")[0].lstrip("<") if link else None
        assert url is None or (url.startswith(hub_env.url) and url.count("filter=") == 2)
    assert sorted(seen) == ["alice/page-a", "alice/page-b"]


def test_health_answers_without_a_token_and_says_nothing_of_the_repos(registry):
    import urllib.request

    with urllib.request.urlopen(f"{registry.url}/health", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
