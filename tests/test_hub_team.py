"""The registry shared by a team: users, organisations and who may do what; branches; dataset
repos next to model repos; the rest of the Hub API their clients call (paths-info and copies,
settings, moves, squashes, `hf repos ls`); and clear refusals of what it does not implement.

Everything goes through `loradock hub serve` in its own process and unmodified clients:
huggingface_hub's HfApi, the `hf` CLI, `datasets`, transformers and loradock's own CLI.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx2
import pytest

from loradock.procs import loradock_command
from tests.conftest import RegistryProcess, adapter_folder


def hub(root, *args) -> str:
    """`loradock hub ARGS --root ROOT` in its own process; its stdout."""
    done = subprocess.run(loradock_command("hub", *args, "--root", root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A registry of its own: users alice, bob, carol and dave; organisation `lab` where alice and
    dave write and bob reads; a token per user, alice's read-only one, and an admin's."""
    tmp = tmp_path_factory.mktemp("team")
    server = RegistryProcess(tmp / "root", tmp / "server.log")
    server.root.mkdir()
    for user in ("alice", "bob", "carol", "dave"):
        assert hub(server.root, "user", "add", user) == f"user {user} added"
    hub(server.root, "org", "add", "lab", "--member", "alice:write", "--member", "bob", "--member", "dave:write")
    server.start()
    server.tokens = {user: hub(server.root, "token", "create", "--user", user) for user in ("alice", "bob", "carol", "dave")}
    server.tokens["alice-read"] = hub(server.root, "token", "create", "--user", "alice", "--read-only")
    server.tokens["admin"] = hub(server.root, "token", "create", "--user", "root", "--admin")
    server.tokens["anonymous"] = None
    yield server
    server.stop()


def api(team, who):
    from hub.client import hub_api

    return hub_api(team.url, team.tokens[who])


def through_endpoint(monkeypatch, team) -> None:
    """Point libraries that build their own HfApi (transformers, datasets) at the team registry,
    as HF_ENDPOINT, HF_TOKEN and HF_HUB_DISABLE_XET set before the import would."""
    for name, value in [("HF_ENDPOINT", team.url), ("HF_TOKEN", team.tokens["alice"]), ("HF_HUB_DISABLE_XET", "1")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", team.url)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)


def status_of(call) -> int:
    """200 when `call` succeeds, else the HTTP status the registry answered (404 for a repo a
    listing does not show: see `_listed`)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        call()
        return 200
    except HfHubHTTPError as e:
        return e.response.status_code
    except LookupError:
        return 404


# --- who may do what ---------------------------------------------------------------------------

def actions(api_, repo_id: str, fresh: str) -> dict:
    """One call per right, on `repo_id` (created just before), `fresh` a repo id not yet taken."""
    from huggingface_hub import CommitOperationAdd

    return {
        "read": lambda: api_.model_info(repo_id),
        "list": lambda: _listed(api_, repo_id),
        "create": lambda: api_.create_repo(fresh),
        "upload": lambda: api_.create_commit(repo_id, [CommitOperationAdd("f.txt", b"x")], commit_message="up"),
        "tag": lambda: api_.create_tag(repo_id, tag="v1"),
        "branch": lambda: api_.create_branch(repo_id, branch="dev"),
        "settings": lambda: api_.update_repo_settings(repo_id, private=True),
        "delete": lambda: api_.delete_repo(repo_id),
    }


def _listed(api_, repo_id: str) -> None:
    """Raises LookupError unless a listing (searched by name) shows `repo_id`."""
    if repo_id not in [m.id for m in api_.list_models(search=repo_id.split("/")[1])]:
        raise LookupError(f"{repo_id} is not listed")


def expected(role: str, private: bool, action: str) -> int:
    """The status a caller of `role` gets for `action` on a repo: a private repo they may not see
    is a 404, one they see but may not change a 403, a write without a token a 401."""
    if role in ("owner", "member-write", "admin"):
        return 200
    sees = not private or role in ("member-read", "owner-read")
    if action in ("read", "list"):
        return 200 if sees else 404
    if role == "anonymous":
        return 401
    if role == "owner-read":
        return 403
    return 403 if sees or action == "create" else 404


CALLERS = {  # token -> its role towards alice's namespace and towards the organisation lab
    "alice": ("owner", "member-write"), "alice-read": ("owner-read", "owner-read"), "bob": ("stranger", "member-read"),
    "carol": ("stranger", "stranger"), "dave": ("stranger", "member-write"), "admin": ("admin", "admin"),
    "anonymous": ("anonymous", "anonymous"),
}


def test_the_authorization_matrix(team):
    """Every caller x every right x public and private repos, in a user's namespace and an organisation's."""
    admin, wrong, count = api(team, "admin"), [], 0
    for who, roles in CALLERS.items():
        for namespace, role in zip(("alice", "lab"), roles):
            for private in (False, True):
                for action in actions(None, "", ""):
                    count += 1
                    repo_id = f"{namespace}/m-{who}-{int(private)}-{action}"
                    admin.create_repo(repo_id, private=private)
                    got = status_of(actions(api(team, who), repo_id, f"{namespace}/new-{who}-{int(private)}")[action])
                    if got != expected(role, private, action):
                        wrong.append((who, repo_id, action, got, expected(role, private, action)))
    assert count == 7 * 2 * 2 * 8 and not wrong, "\n".join(map(str, wrong))


def test_alices_adapter_in_an_organisation_bob_reads_it_carol_cannot_see_it(run_cli, team, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", team.url)
    monkeypatch.setenv("LORADOCK_CONFIG_DIR", str(tmp_path / "config"))
    pushed = run_cli("push", adapter_folder(tmp_path / "a", os.urandom(1 << 16)), "lab/reverse", "--private",
                     "--tag", "v1", "--token", team.tokens["alice"])
    assert pushed.code == 0, pushed.text
    pulled = run_cli("pull", "lab/reverse@v1", "--to", tmp_path / "bob", "--token", team.tokens["bob"])
    assert pulled.code == 0, pulled.text
    assert (tmp_path / "bob" / "adapter_model.safetensors").read_bytes() == (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    listed = run_cli("list", "--token", team.tokens["bob"])
    assert "lab/reverse (private)" in listed.out

    hidden = run_cli("pull", "lab/reverse@v1", "--to", tmp_path / "carol", "--token", team.tokens["carol"])
    assert hidden.code == 2 and "not found" in hidden.err and not (tmp_path / "carol").exists()
    assert "lab/reverse" not in run_cli("list", "--token", team.tokens["carol"]).out
    refused = run_cli("push", adapter_folder(tmp_path / "b"), "lab/reverse", "--token", team.tokens["bob"])
    assert refused.code == 2 and "may not write to lab/reverse" in refused.err


def test_whoami_names_the_user_and_their_organisations(team):
    me = api(team, "bob").whoami()
    assert me["name"] == "bob" and [(o["name"], o["roleInOrg"]) for o in me["orgs"]] == [("lab", "read")]
    assert api(team, "alice-read").whoami()["auth"]["accessToken"]["role"] == "read"


def test_a_removed_users_tokens_stop_working_at_once(team):
    token = hub(team.root, "token", "create", "--user", "erin")
    api_ = api(team, "admin")
    from hub.client import hub_api

    erin = hub_api(team.url, token)
    erin.create_repo("erin/mine", private=True)
    assert "1 token(s) revoked" in hub(team.root, "user", "remove", "erin")
    assert status_of(lambda: erin.model_info("erin/mine")) == 401
    assert status_of(lambda: erin.whoami()) == 401
    assert api_.model_info("erin/mine").private  # its repos stay, for an admin to move or delete


def test_admin_commands_refuse_bad_input_with_the_fix(team, tmp_path):
    cases = [
        (["org", "add", "lab2", "--member", "nobody:write"], "is not a user of this registry"),
        (["org", "add", "lab2", "--member", "bob:owner"], "member role 'owner'"),
        (["user", "add", "lab"], "already an organisation"),
        (["user", "add", "datasets"], "reserved"),
        (["user", "add", "bad/name"], "invalid user name"),
        (["user", "remove", "nobody"], "there is no user"),
        (["token", "create", "--user", "lab"], "already an organisation"),
    ]
    for args, message in cases:
        done = subprocess.run(loradock_command("hub", *args, "--root", team.root), capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    missing = subprocess.run(loradock_command("hub", "user", "list", "--root", tmp_path / "nothing"),
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "there is no registry" in missing.stderr
    listing = hub(team.root, "user", "list")
    assert "org   lab  members: alice:write, bob:read, dave:write" in listing and "user  carol" in listing


def test_repos_created_at_once_all_exist(team):
    alice = api(team, "alice")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(status_of(lambda: alice.create_repo(f"alice/burst-{i}"))))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    assert len({alice.model_info(f"alice/burst-{i}").sha for i in range(12)}) == 12


# --- blobs follow permissions ----------------------------------------------------------------

def test_a_private_blob_cannot_be_linked_by_who_cannot_read_it(team):
    from huggingface_hub import CommitOperationAdd

    secret = os.urandom(3 << 20)
    oid = hashlib.sha256(secret).hexdigest()
    alice, carol = api(team, "alice"), api(team, "carol")
    alice.create_repo("alice/vault", private=True)
    alice.create_commit("alice/vault", [CommitOperationAdd("w.bin", secret)], commit_message="secret")
    carol.create_repo("carol/thief")
    head = carol.model_info("carol/thief").sha
    auth = {"authorization": f"Bearer {team.tokens['carol']}"}

    batch = httpx2.post(f"{team.url}/carol/thief.git/info/lfs/objects/batch", headers=auth,
                        json={"operation": "upload", "objects": [{"oid": oid, "size": len(secret)}]}).json()
    assert "actions" in batch["objects"][0]  # asked to upload, as for any unknown object: no existence leaked
    verify = httpx2.post(batch["objects"][0]["actions"]["verify"]["href"], headers=auth, json={"oid": oid, "size": len(secret)})
    assert verify.status_code == 400
    line = b'{"key": "lfsFile", "value": {"path": "stolen.bin", "algo": "sha256", "oid": "%s", "size": %d}}\n' % (
        oid.encode(), len(secret))
    commit = httpx2.post(f"{team.url}/api/models/carol/thief/commit/main", headers=auth,
                         content=b'{"key": "header", "value": {"summary": "steal"}}\n' + line)
    assert commit.status_code == 400 and "was not uploaded" in commit.json()["error"]
    assert carol.model_info("carol/thief").sha == head

    # bob reads lab's private repos, so he may link their blobs; his own upload of the same bytes works too.
    alice.create_repo("lab/shared-weights", private=True)
    alice.create_commit("lab/shared-weights", [CommitOperationAdd("w.bin", secret)], commit_message="shared")
    bob = api(team, "bob")
    bob.create_repo("bob/copy")
    linked = httpx2.post(f"{team.url}/api/models/bob/copy/commit/main", headers={"authorization": f"Bearer {team.tokens['bob']}"},
                         content=b'{"key": "header", "value": {"summary": "link"}}\n' + line)
    assert linked.status_code == 200, linked.text
    carol.create_commit("carol/thief", [CommitOperationAdd("mine.bin", secret)], commit_message="own bytes")
    assert "mine.bin" in carol.list_repo_files("carol/thief")


# --- branches ----------------------------------------------------------------------------------

def test_branches_commits_uploads_and_downloads(team, tmp_path):
    from huggingface_hub import hf_hub_download

    alice = api(team, "alice")
    alice.create_repo("alice/branchy")
    v1 = alice.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="alice/branchy").oid
    alice.create_tag("alice/branchy", tag="v1")
    alice.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id="alice/branchy")
    alice.create_branch("alice/branchy", branch="dev", revision="v1")
    dev = alice.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id="alice/branchy", revision="dev").oid
    alice.create_branch("alice/branchy", branch="feat/x")
    refs = alice.list_repo_refs("alice/branchy")
    assert {b.name: b.target_commit for b in refs.branches}["dev"] == dev
    assert sorted(b.name for b in refs.branches) == ["dev", "feat/x", "main"]
    assert [c.commit_id for c in alice.list_repo_commits("alice/branchy", revision="dev")][1] == v1
    read = lambda rev: open(hf_hub_download("alice/branchy", "a.txt", revision=rev, endpoint=team.url,  # noqa: E731
                                            token=team.tokens["alice"], cache_dir=tmp_path / "c")).read()
    assert (read("dev"), read("main"), read("v1"), read("feat/x")) == ("dev", "two", "one", "two")

    from huggingface_hub.errors import HfHubHTTPError
    for branch, status in [("d" * 40, 400), ("v1", 409), ("a..b", 400), ("refs/pr/1", 400), ("dev", 409)]:
        with pytest.raises(HfHubHTTPError) as e:
            alice.create_branch("alice/branchy", branch=branch)
        assert e.value.response.status_code == status, branch
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_tag("alice/branchy", tag="dev")
    assert e.value.response.status_code == 409 and "may not share a name" in e.value.server_message
    with pytest.raises(HfHubHTTPError) as e:
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/branchy", revision="v1")
    assert e.value.response.status_code == 400 and "commits go to a branch" in e.value.server_message
    with pytest.raises(HfHubHTTPError) as e:
        alice.delete_branch("alice/branchy", branch="main")
    assert e.value.response.status_code == 400
    alice.delete_branch("alice/branchy", branch="dev")
    assert "dev" not in [b.name for b in alice.list_repo_refs("alice/branchy").branches]
    assert read(dev) == "dev"  # a pinned commit outlives its branch


def test_push_to_hub_on_a_branch_through_transformers(team, base_model_dir, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    through_endpoint(monkeypatch, team)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    alice = api(team, "alice")
    alice.create_repo("alice/tok")
    alice.create_branch("alice/tok", branch="exp")
    tokenizer.push_to_hub("alice/tok", revision="exp", token=team.tokens["alice"])
    files = alice.list_repo_files("alice/tok", revision="exp")
    assert "tokenizer_config.json" in files and "tokenizer_config.json" not in alice.list_repo_files("alice/tok")


# --- dataset repos -----------------------------------------------------------------------------

DATASETS_SCRIPT = """
import sys, datasets
from huggingface_hub import HfApi
api, cache = HfApi(), sys.argv[1]
first = datasets.Dataset.from_list([{"prompt": "abc", "response": "cba"}, {"prompt": "xy", "response": "yx"}])
first.push_to_hub("alice/mirror")
v1 = api.dataset_info("alice/mirror").sha
api.create_tag("alice/mirror", tag="v1", repo_type="dataset")
datasets.Dataset.from_list([{"prompt": "q", "response": "q"}]).push_to_hub("alice/mirror")
assert datasets.load_dataset("alice/mirror", revision="v1", split="train", cache_dir=cache + "/1").to_list() == first.to_list()
assert datasets.load_dataset("alice/mirror", revision=v1, split="train", cache_dir=cache + "/2").num_rows == 2
assert datasets.load_dataset("alice/mirror", split="train", cache_dir=cache + "/3").num_rows == 1
print(v1)
"""


def test_datasets_push_and_load_by_revision_next_to_a_model_of_the_same_name(team, tmp_path):
    """`Dataset.push_to_hub` and `load_dataset(revision=...)` unmodified, in a process of their own
    with HF_ENDPOINT and HF_TOKEN set, as a user runs them."""
    alice = api(team, "alice")
    alice.create_repo("alice/mirror")  # a model of the name
    model_head = alice.model_info("alice/mirror").sha
    env = {**os.environ, "HF_ENDPOINT": team.url, "HF_TOKEN": team.tokens["alice"], "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-c", DATASETS_SCRIPT, str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    v1 = done.stdout.split()[-1]

    assert "alice/mirror" in [d.id for d in alice.list_datasets(search="mirror")]
    assert [m.id for m in alice.list_models(search="mirror")] == ["alice/mirror"]
    assert alice.model_info("alice/mirror").sha == model_head != v1
    assert any(f.endswith(".parquet") for f in alice.list_repo_files("alice/mirror", repo_type="dataset"))
    assert alice.list_repo_files("alice/mirror") == [".gitattributes"]
    url = alice.create_repo("alice/only-data", repo_type="dataset")
    assert url.repo_type == "dataset" and "alice/only-data" not in [m.id for m in alice.list_models()]
    from huggingface_hub.errors import RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/only-data")
    alice.delete_repo("alice/mirror", repo_type="dataset")
    assert alice.model_info("alice/mirror").sha == model_head  # the model of the name is untouched


def test_a_private_dataset_is_hidden_like_a_private_model(team):
    from huggingface_hub.errors import RepositoryNotFoundError

    api(team, "alice").create_repo("lab/votes", repo_type="dataset", private=True)
    assert api(team, "bob").dataset_info("lab/votes").private
    for who in ("carol", "anonymous"):
        with pytest.raises(RepositoryNotFoundError):
            api(team, who).dataset_info("lab/votes")
        assert "lab/votes" not in [d.id for d in api(team, who).list_datasets()]


# --- pull requests: refused before anything is committed ---------------------------------------

def test_create_pr_is_refused_before_anything_is_committed(team, base_model_dir, monkeypatch, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    alice = api(team, "alice")
    alice.create_repo("alice/no-prs")
    head = alice.model_info("alice/no-prs").sha
    for content in (b"small", os.urandom(2 << 20)):
        with pytest.raises(HfHubHTTPError) as e:
            alice.upload_file(path_or_fileobj=content, path_in_repo="f.bin", repo_id="alice/no-prs", create_pr=True)
        assert e.value.response.status_code == 501 and e.value.response.headers["X-Error-Code"] == "NotSupported"
        assert "pull requests are not supported by this registry" in str(e.value)

    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    (tmp_path / "f.txt").write_text("x")
    done = subprocess.run([hf, "upload", "alice/no-prs", str(tmp_path / "f.txt"), "f.txt", "--create-pr"],
                          env={**os.environ, "HF_ENDPOINT": team.url, "HF_TOKEN": team.tokens["alice"],
                               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"},
                          capture_output=True, text=True)
    assert done.returncode != 0 and "pull requests are not supported by this registry" in done.stdout + done.stderr

    from transformers import AutoTokenizer
    through_endpoint(monkeypatch, team)
    with pytest.raises(HfHubHTTPError) as e:
        AutoTokenizer.from_pretrained(base_model_dir).push_to_hub("alice/no-prs", create_pr=True, token=team.tokens["alice"])
    assert e.value.response.status_code == 501
    assert alice.model_info("alice/no-prs").sha == head and alice.list_repo_files("alice/no-prs") == [".gitattributes"]


# --- the rest of the API -----------------------------------------------------------------------

def test_paths_info_and_copies_of_lfs_and_regular_files(team):
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    alice = api(team, "alice")
    alice.create_repo("alice/copies")
    weights = os.urandom(2 << 20)
    alice.create_commit("alice/copies", [CommitOperationAdd("w/model.safetensors", weights),
                                         CommitOperationAdd("config.json", b"{}")], commit_message="files")
    info = alice.get_paths_info("alice/copies", ["config.json", "w", "w/model.safetensors", "missing"])
    assert [type(i) for i in info] == [RepoFile, RepoFolder, RepoFile]
    assert info[2].lfs.sha256 == hashlib.sha256(weights).hexdigest() and info[2].size == len(weights)
    alice.create_commit("alice/copies", [CommitOperationCopy("w/model.safetensors", "backup/model.safetensors"),
                                         CommitOperationCopy("config.json", "backup/config.json")], commit_message="copy")
    files = {f.path: f for f in alice.list_repo_tree("alice/copies", recursive=True) if isinstance(f, RepoFile)}
    assert files["backup/model.safetensors"].lfs.sha256 == files["w/model.safetensors"].lfs.sha256
    assert files["backup/config.json"].blob_id == files["config.json"].blob_id


def test_visibility_move_squash_and_repos_ls(team, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    alice, carol = api(team, "alice"), api(team, "carol")
    alice.create_repo("alice/settable")
    for n in range(3):
        alice.upload_file(path_or_fileobj=str(n).encode(), path_in_repo="n.txt", repo_id="alice/settable")
    alice.update_repo_settings("alice/settable", private=True)
    with pytest.raises(RepositoryNotFoundError):
        carol.model_info("alice/settable")
    alice.update_repo_settings("alice/settable", visibility="public")
    assert carol.model_info("alice/settable").private is False

    pinned = alice.model_info("alice/settable").sha
    alice.move_repo("alice/settable", "lab/settled")
    assert alice.model_info("lab/settled").sha == pinned
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/settable")
    assert status_of(lambda: carol.move_repo("lab/settled", "carol/taken")) == 403

    assert len(alice.list_repo_commits("lab/settled")) == 4
    alice.super_squash_history("lab/settled")
    commits = alice.list_repo_commits("lab/settled")
    assert len(commits) == 1 and alice.hf_hub_download("lab/settled", "n.txt", cache_dir=tmp_path / "c") \
        and open(alice.hf_hub_download("lab/settled", "n.txt", cache_dir=tmp_path / "c")).read() == "2"
    assert alice.model_info("lab/settled", revision=pinned).sha == pinned  # what pinned the old commits still resolves

    alice.create_repo("alice/listed", repo_type="dataset")
    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    env = {**os.environ, "HF_ENDPOINT": team.url, "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    mine = subprocess.run([hf, "repos", "ls", "--format", "json", "--limit", "0"], env={**env, "HF_TOKEN": team.tokens["alice"]},
                          capture_output=True, text=True)
    assert mine.returncode == 0, mine.stderr
    assert '"id": "alice/listed", "type": "dataset"' in mine.stdout and "lab/" not in mine.stdout
    org = subprocess.run([hf, "repos", "ls", "--namespace", "lab", "--limit", "0"], env={**env, "HF_TOKEN": team.tokens["carol"]},
                         capture_output=True, text=True)
    assert org.returncode == 0 and "lab/settled" in org.stdout and "lab/votes" not in org.stdout


def test_uploads_without_the_xet_switch_are_told_how_to_fix_it(team, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(os.urandom(2 << 20))
    api(team, "alice").create_repo("alice/xet")
    script = ("from huggingface_hub import HfApi\n"
              f"HfApi(endpoint={team.url!r}, token={team.tokens['alice']!r}).upload_file("
              f"path_or_fileobj={str(tmp_path / 'w.safetensors')!r}, path_in_repo='w.safetensors', repo_id='alice/xet')\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "HF_HUB_DISABLE_XET=1" in done.stderr, done.stderr[-2000:]
    # hf_xet shows only the URL of what failed, so the answer redirects to one that names the fix.
    xet = httpx2.get(f"{team.url}/api/models/alice/xet/xet-write-token/main",
                     headers={"authorization": f"Bearer {team.tokens['alice']}"})
    assert xet.status_code == 307 and "HF_HUB_DISABLE_XET=1" in xet.headers["location"]
    for answer in (xet, httpx2.get(f"{team.url}{xet.headers['location']}")):
        assert answer.headers["X-Error-Code"] == "NotSupported" and "HF_HUB_DISABLE_XET=1" in answer.headers["X-Error-Message"]
        assert "Xet storage is not supported by this registry" in answer.json()["error"]
    assert httpx2.get(f"{team.url}{xet.headers['location']}").status_code == 501


def test_unsupported_and_unknown_routes_say_so(team):
    discussions = httpx2.get(f"{team.url}/api/models/alice/xet/discussions")
    assert discussions.status_code == 501 and "discussions" in discussions.json()["error"]
    spaces = httpx2.get(f"{team.url}/api/spaces/alice/app")
    assert spaces.status_code == 501 and "Spaces are not supported" in spaces.json()["error"]
    typo = httpx2.get(f"{team.url}/api/modles/alice/xet")
    assert typo.status_code == 404 and typo.headers["X-Error-Code"] == "RouteNotFound"
    assert "no route GET /api/modles/alice/xet" in typo.json()["error"]
    missing = httpx2.get(f"{team.url}/api/models/alice/never-made")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "RepoNotFound"


def test_a_commit_waiting_on_the_database_does_not_stall_other_requests(team):
    """A commit runs in a worker thread: while one waits for the write lock (held here, as a long
    commit or `hub gc` would), downloads and listings are answered at once."""
    import sqlite3

    from huggingface_hub import CommitOperationAdd

    alice = api(team, "alice")
    alice.create_repo("alice/waiting")
    alice.create_repo("alice/small")
    alice.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="alice/small")
    lock = sqlite3.connect(team.root / "registry.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    done = []
    worker = threading.Thread(target=lambda: done.append(alice.create_commit(
        "alice/waiting", [CommitOperationAdd(f"f/{i}.txt", os.urandom(64)) for i in range(300)], commit_message="wait")))
    try:
        worker.start()
        time.sleep(2)  # the commit is now waiting for the lock
        auth = {"authorization": f"Bearer {team.tokens['alice']}"}
        assert httpx2.get(f"{team.url}/alice/small/resolve/main/a.txt", headers=auth, timeout=10).content == b"hello"
        assert httpx2.get(f"{team.url}/api/models", headers=auth, timeout=10).status_code == 200
        assert not done
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    worker.join(60)
    assert done and len(alice.list_repo_files("alice/waiting")) == 301


OLD_SCHEMA = """
CREATE TABLE repos (id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, private INTEGER NOT NULL,
    created_at TEXT NOT NULL, UNIQUE (namespace, name));
CREATE TABLE commits (oid TEXT PRIMARY KEY, repo_id INTEGER NOT NULL, parent TEXT, title TEXT NOT NULL,
    message TEXT NOT NULL, author TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE tree_entries (commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, PRIMARY KEY (commit_oid, path));
CREATE TABLE refs (repo_id INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, commit_oid TEXT NOT NULL,
    PRIMARY KEY (repo_id, kind, name));
CREATE TABLE tokens (hash TEXT PRIMARY KEY, name TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_a_registry_of_the_previous_schema_opens_with_its_repos_and_tokens(tmp_path):
    """Repos without a type become model repos; the users its tokens name become users, and the
    namespaces no user owns organisations of those users."""
    import sqlite3

    from hub.objects import git_blob_sha1
    from hub.storage import GITATTRIBUTES

    root = tmp_path / "old"
    (root / "blobs" / hashlib.sha256(GITATTRIBUTES).hexdigest()[:2]).mkdir(parents=True)
    (root / "blobs" / hashlib.sha256(GITATTRIBUTES).hexdigest()[:2] / hashlib.sha256(GITATTRIBUTES).hexdigest()).write_bytes(GITATTRIBUTES)
    token = "hf_" + "x" * 40
    db = sqlite3.connect(root / "registry.sqlite")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO repos VALUES (1, 'alice', 'kept', 1, '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO commits VALUES (?, 1, NULL, 'initial commit', '', 'alice', '2026-01-01T00:00:00.000Z')", ("c" * 40,))
    db.execute("INSERT INTO tree_entries VALUES (?, '.gitattributes', ?, ?, ?, 0)",
               ("c" * 40, hashlib.sha256(GITATTRIBUTES).hexdigest(), len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES)))
    db.execute("INSERT INTO refs VALUES (1, 'branch', 'main', ?)", ("c" * 40,))
    db.execute("INSERT INTO repos VALUES (2, 'loradock', 'base', 0, '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO commits VALUES (?, 2, NULL, 'initial commit', '', 'alice', '2026-01-01T00:00:00.000Z')", ("d" * 40,))
    db.execute("INSERT INTO tree_entries VALUES (?, '.gitattributes', ?, ?, ?, 0)",
               ("d" * 40, hashlib.sha256(GITATTRIBUTES).hexdigest(), len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES)))
    db.execute("INSERT INTO refs VALUES (2, 'branch', 'main', ?)", ("d" * 40,))
    db.execute("INSERT INTO tokens VALUES (?, 'cli', 'alice', 'write', '2026-01-01T00:00:00.000Z')",
               (hashlib.sha256(token.encode()).hexdigest(),))
    db.commit()
    db.close()

    server = RegistryProcess(root, tmp_path / "server.log").start()
    try:
        from hub.client import hub_api

        alice = hub_api(server.url, token)
        assert alice.model_info("alice/kept").sha == "c" * 40 and alice.model_info("alice/kept").private
        alice.upload_file(path_or_fileobj=b"new", path_in_repo="n.txt", repo_id="alice/kept")
        alice.create_repo("alice/kept", repo_type="dataset")
        # A namespace no user owned is an organisation its old users write to, as they did before.
        alice.upload_file(path_or_fileobj=b"w", path_in_repo="w.txt", repo_id="loradock/base")
        assert [(o["name"], o["roleInOrg"]) for o in alice.whoami()["orgs"]] == [("loradock", "write")]
        assert status_of(lambda: hub_api(server.url, None).model_info("alice/kept")) == 404
        # The refs table of the old schema gains tag messages.
        alice.create_tag("alice/kept", tag="v1", tag_message="the first one")
        refs = httpx2.get(f"{server.url}/api/models/alice/kept/refs", headers={"Authorization": f"Bearer {token}"}).json()
        assert [(t["name"], t["targetCommit"], t["message"]) for t in refs["tags"]] == [
            ("v1", alice.model_info("alice/kept").sha, "the first one")]
        assert [b["name"] for b in refs["branches"]] == ["main"]
    finally:
        server.stop()
