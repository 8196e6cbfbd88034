"""The registry's one door: `Registry`, the only code in loradock that talks to huggingface_hub's
client, for any Hub endpoint: the embedded registry (default), huggingface.co, or a company Hub.
Push, pull, list, refs and tags, dataset files, whoami: each returns loradock's values
(`Revision`, `PushResult`, `PullResult`, the listing's rows) and raises loradock's typed errors.

The registry: `--registry`, else `LORADOCK_REGISTRY`, else `HF_ENDPOINT`, else the embedded registry
on 127.0.0.1:8090. Its token: `--token`, else `LORADOCK_TOKEN`, else the one `loradock hub login`
stored for that registry, else, only for the Hub the `HF_*` variables are about (huggingface.co,
or the Hub `HF_ENDPOINT` names), `HF_TOKEN` or huggingface_hub's own login. So a Hugging Face
user's `HF_TOKEN` never reaches loradock's own registry, and `HF_ENDPOINT` need not be changed
(which would send base-model downloads there too) to reach it.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hub.adapter import CARD, CONFIG, METRICS, PULL_MARKER, AdapterRef, check_repo_id, read_json
from hub.adapter.card import CardInfo, build_card
from hub.adapter.checks import check_publishable, folder_files
from hub.adapter.records import RunRecord
from hub.transfer import DISTRUST_FIX, checked_listing, move_into_place, pulled_sha, staged_path
from hub.objects import SHA1_HEX
from loradock.errors import LoradockError, RegistryRefused, RepoNotFound, RevisionNotFound, Unreachable
from loradock.home import home

DEFAULT_ENDPOINT = "http://127.0.0.1:8090"
HF_HOSTS = ("huggingface.co", "hf.co")
DEFAULT_MAX_FILE_SIZE = 5 * 2**30


REGISTRY_ENV, TOKEN_ENV = "LORADOCK_REGISTRY", "LORADOCK_TOKEN"


def endpoint_url(explicit: str | None = None) -> str:
    """The registry's URL (see the module's docstring for the order)."""
    return (explicit or os.environ.get(REGISTRY_ENV) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def credentials_path() -> Path:
    return Path(os.environ.get("LORADOCK_CONFIG_DIR") or Path.home() / ".config" / "loradock") / "credentials.json"


def stored_tokens() -> dict:
    try:
        return json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {}


def save_token(endpoint: str, token: str | None) -> None:
    """Store (or with None, forget) the token for an endpoint, readable by the user only."""
    tokens = stored_tokens()
    if token is None:
        tokens.pop(endpoint, None)
    else:
        tokens[endpoint] = token
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    os.replace(path.with_suffix(".tmp"), path)


def token_for(endpoint: str, explicit: str | None = None) -> str | None:
    """The token for the registry at `endpoint` (see the module's docstring for the order)."""
    token = explicit or os.environ.get(TOKEN_ENV) or stored_tokens().get(endpoint)
    if token is None and is_hf_hub(endpoint):
        from huggingface_hub import get_token

        token = os.environ.get("HF_TOKEN") or get_token()
    return token


def is_hf_hub(endpoint: str) -> bool:
    """Whether `endpoint` is the Hub the `HF_*` variables are about: huggingface.co, or HF_ENDPOINT's."""
    hf_endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/")
    return any(host in endpoint for host in HF_HOSTS) or (bool(hf_endpoint) and endpoint.rstrip("/") == hf_endpoint)


def hub_api(endpoint: str, token: str | None):
    """huggingface_hub's own client for the endpoint, exactly this `token` (None: anonymous): what
    `Registry` is built on, and what tests of the registry's protocol use. Off huggingface.co there
    is no Xet service, so uploads must take the Git LFS path; huggingface_hub reads that switch once,
    at import, hence the constant too."""
    import huggingface_hub
    from huggingface_hub import HfApi

    from hub.timeouts import bound_huggingface_hub

    if not any(host in endpoint for host in HF_HOSTS):
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        huggingface_hub.constants.HF_HUB_DISABLE_XET = True
    bound_huggingface_hub()  # every call it makes gives up after hub.timeouts' silences
    return HfApi(endpoint=endpoint, token=token or False, library_name="loradock")


@contextlib.contextmanager
def hub_errors(endpoint: str, repo_id: str, revision: str | None = None):
    """huggingface_hub's exceptions as loradock's typed errors, each with the fix. A failed LFS
    upload arrives as huggingface_hub's `RuntimeError("Error while uploading ...")` raised from the
    HTTP error, which is translated like the error itself."""
    try:
        yield
    except Exception as e:
        cause = e.__cause__ if type(e) is RuntimeError and e.__cause__ is not None else e
        translated = _translated(cause, endpoint, repo_id, revision)
        if translated is None:
            raise
        raise translated from None


DISK_FULL_FIX = ("ask the registry's operator to free space on its disk (`loradock hub gc` there removes the files "
                 "no commit references), then push again")
START_FIX = "start it with `loradock hub serve`, or pass --registry / set LORADOCK_REGISTRY"
SILENT_FIX = ("check that the registry is running and not stopped or overloaded (its /health answers at once when "
              "it is well), then try again")


def _translated(error: Exception, endpoint: str, repo_id: str, revision: str | None) -> LoradockError | None:
    """The loradock error for a huggingface_hub or HTTP error (see `hub_errors`); None for any other."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from hub.timeouts import seconds_waited

    if isinstance(error, OfflineModeIsEnabled):
        return LoradockError(f"HF_HUB_OFFLINE is set, so huggingface_hub will not contact {endpoint}",
                             "unset HF_HUB_OFFLINE (the embedded registry is local, not the internet)")
    if isinstance(error, RevisionNotFoundError):
        return RevisionNotFound(f"{repo_id} has no revision {revision!r} at {endpoint}",
                                f"use a branch, a tag or a full 40-character commit sha of {repo_id} "
                                "(`loradock list` shows them)")
    if isinstance(error, RepositoryNotFoundError):
        return RepoNotFound(f"repo {repo_id} not found at {endpoint} (or it is private and no token was sent)",
                            "check the id with `loradock list`, or log in with `loradock hub login`")
    if isinstance(error, EntryNotFoundError):
        return LoradockError(f"{repo_id}@{revision}: {error}", "check the file name")
    if isinstance(error, HFValidationError):
        return LoradockError(f"invalid repo id {repo_id!r}: {error}", "use namespace/name, e.g. alice/reverse")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        detail = error.server_message or str(error).splitlines()[0]
        if status == 507:
            return RegistryRefused(f"the registry at {endpoint} is out of disk space: nothing was pushed",
                                   DISK_FULL_FIX, status)
        fixes = {401: "log in with `loradock hub login` or set LORADOCK_TOKEN (a token of this registry)",
                 403: "use a write token (`loradock hub token create` on the registry)",
                 412: "someone pushed in between: push again (it will build on the new head)"}
        return RegistryRefused(f"the registry at {endpoint} refused: {detail}", fixes.get(status, "see the message above"),
                               status)
    if isinstance(error, httpx2.TimeoutException):
        waited = seconds_waited(error)
        return Unreachable(f"the registry at {endpoint} did not answer within "
                           + (f"{waited:g} s" if waited else "its time limit"), SILENT_FIX)
    if isinstance(error, (httpx2.ConnectError, ConnectionError)):
        return Unreachable(f"cannot reach the registry at {endpoint}", START_FIX)
    return None



# --- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Revision:
    """A revision of a repo as the registry resolved it: what was asked for (`ref`: a branch, a tag
    or a commit), the commit it is, and the tags that point at that commit."""
    repo_id: str
    ref: str
    commit: str
    tags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit}"


@dataclass(frozen=True)
class ListedAdapter:
    """An adapter as the registry lists it: its main branch's commit, its tags and what its card says."""
    repo_id: str
    commit: str  # main's
    tags: dict[str, str]  # tag -> the commit it points at
    card: CardInfo
    private: bool = False


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit: str
    tag: str | None
    url: str


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    path: Path


class Registry:
    """One registry as this process talks to it: its URL and token resolved once (`endpoint_url`,
    `token_for`), one `HfApi`, and every call loradock makes to it, each returning loradock's values
    and raising loradock's typed errors (`hub_errors`). The only code that uses huggingface_hub's
    client; `registry()` gives the process's shared one for a URL and token."""

    def __init__(self, url: str | None = None, token: str | None = None):
        self.url = endpoint_url(url)
        self.token = token_for(self.url, token)
        self.api = hub_api(self.url, self.token)

    def errors(self, repo_id: str, revision: str | None = None):
        return hub_errors(self.url, repo_id, revision)

    def whoami(self) -> str:
        """The name of the user the token belongs to."""
        with self.errors("(whoami)"):
            return self.api.whoami()["name"]

    def check_reachable(self, timeout: float = 3, fix: str = "") -> None:
        """Fail fast when nothing answers (huggingface_hub itself retries for ~20 s).

        Raises:
            Unreachable: with `fix`, or the default one.
        """
        import httpx2

        try:
            httpx2.get(f"{self.url}/api/models", params={"limit": 1}, timeout=timeout)
        except httpx2.TransportError:
            raise Unreachable(f"cannot reach the registry at {self.url}", fix or START_FIX) from None

    # --- reading ---

    def exists(self, repo_id: str) -> bool:
        with self.errors(repo_id):
            return self.api.repo_exists(repo_id)

    def tags(self, repo_id: str) -> dict[str, str]:
        """Each tag of the repo and the commit it points at."""
        return self.refs(repo_id)[1]

    def refs(self, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """(branches, tags) of the repo, each name -> the commit it points at, read in one request."""
        with self.errors(repo_id):
            refs = self.api.list_repo_refs(repo_id)
        return {b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags}

    def first_commit(self, repo_id: str) -> str:
        """The oldest commit of the repo's main branch."""
        with self.errors(repo_id, "main"):
            return self.api.list_repo_commits(repo_id)[-1].commit_id

    def read_file(self, repo_id: str, revision: str, filename: str) -> str | None:
        """The text of one file of a revision (from the Hub cache when `revision` is a commit sha that
        was read before); None when the revision has no such file."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        with self.errors(repo_id, revision):
            try:
                path = hf_hub_download(repo_id, filename, revision=revision, endpoint=self.url,
                                       token=self.token or False)
            except EntryNotFoundError:
                return None
        return Path(path).read_text(encoding="utf-8")

    def revision(self, repo_id: str, ref: str) -> Revision:
        """Raises: RepoNotFound, RevisionNotFound, Unreachable, RegistryRefused."""
        with self.errors(repo_id, ref):
            commit = self.api.model_info(repo_id, revision=ref).sha
        return Revision(repo_id, ref, commit, tuple(sorted(t for t, c in self.tags(repo_id).items() if c == commit)))

    def run_record(self, repo_id: str, commit: str) -> RunRecord:
        """The record training wrote into a revision (metrics.json), its damaged fields left out;
        an empty record without one."""
        folder = self.files(repo_id, commit, (METRICS,))
        return RunRecord.read(folder) if folder else RunRecord()

    def file_sha256(self, repo_id: str, revision: str, filename: str) -> str | None:
        """The sha256 the registry records for one LFS file of a revision (None without such a file)."""
        with self.errors(repo_id, revision):
            info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        return next((s.lfs.sha256 for s in info.siblings or [] if s.rfilename == filename and s.lfs), None)

    def files(self, repo_id: str, revision: str, names: tuple[str, ...]) -> Path | None:
        """The folder (in the Hub cache) holding those of `names` that `repo_id` has at `revision`;
        None when it has none of them."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        folder = None
        with self.errors(repo_id, revision):
            for name in names:
                try:
                    folder = Path(hf_hub_download(repo_id, name, revision=revision, endpoint=self.url,
                                                  token=self.token or False)).parent
                except EntryNotFoundError:
                    continue
        return folder

    def dataset_file(self, repo_id: str, revision: str, filename: str) -> tuple[Path, str]:
        """One file of a dataset repo, pinned: (its copy in the Hub cache, the commit it was read at).

        Raises:
            LoradockError: (typed as `hub_errors` types them) no such repo, revision or file, or an
                answer whose commit is not a sha.
        """
        from huggingface_hub import hf_hub_download

        check_repo_id(repo_id)
        with self.errors(f"datasets/{repo_id}", revision):
            sha = self.api.dataset_info(repo_id, revision=revision).sha
            if not isinstance(sha, str) or not SHA1_HEX.match(sha):
                raise LoradockError(f"the registry at {self.url} answered that datasets/{repo_id}@{revision} is "
                                    f"commit {sha!r}, not a 40-character commit sha", DISTRUST_FIX)
            path = hf_hub_download(repo_id, filename, repo_type="dataset", revision=sha, endpoint=self.url,
                                   token=self.token or False)
        return Path(path), sha

    def list_adapters(self, base_model: str | None = None, search: str | None = None,
                      limit: int = 50) -> list[ListedAdapter]:
        """Newest first, at most `limit` (each adapter costs one more request, for its tags)."""
        listed = []
        with self.errors(search or "(all repos)"):
            models = self.api.list_models(search=search, filter=[f"base_model:{base_model}"] if base_model else None,
                                          cardData=True, sort="last_modified", limit=limit)
            for m in models:
                if not m.card_data or m.card_data.library_name != "peft":
                    continue
                tags = {t.name: t.target_commit for t in self.api.list_repo_refs(m.id).tags}
                listed.append(ListedAdapter(m.id, m.sha, tags, CardInfo.from_card_data(m.card_data), bool(m.private)))
        return listed

    # --- writing ---

    def push(self, folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
             message: str | None = None, model: bool = False, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> PushResult:
        """Validate the folder, then upload it (an adapter with a freshly rendered model card) in one commit."""
        from huggingface_hub import CommitOperationAdd

        folder_path = Path(folder)
        check_repo_id(repo_id)
        files = (check_model_folder if model else check_publishable)(folder_path, max_file_size)
        if not model:
            self.check_parent_base(folder_path)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files
                      if model or rel != CARD]
        if not model:
            card = str(build_card(folder_path, repo_name=repo_id))
            operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
        with self.errors(repo_id):
            url = f"{self.url}/{repo_id}"
            if not self.api.repo_exists(repo_id):
                url = str(self._create_repo(repo_id, private=private))
            if tag and tag in {t.name for t in self.api.list_repo_refs(repo_id).tags}:
                raise LoradockError(f"{repo_id} already has a tag {tag!r}", "choose a new tag (tags never move)")
            head = self.api.model_info(repo_id).sha
            kind = "model" if model else "adapter"
            info = self.api.create_commit(repo_id, operations, parent_commit=head,
                                          commit_message=message or f"Push {kind} {folder_path.name}")
            if tag:
                self.api.create_tag(repo_id, tag=tag, revision=info.oid)
        return PushResult(repo_id, info.oid, tag, url)

    def push_dataset_files(self, repo_id: str, files: list[Path], message: str) -> str:
        """Commit `files` (at the repo's top level) to the dataset repo `repo_id` in one commit,
        creating the repo when it is missing; returns the commit."""
        from huggingface_hub import CommitOperationAdd

        check_repo_id(repo_id)
        with self.errors(repo_id):
            if not self.api.repo_exists(repo_id, repo_type="dataset"):
                self._create_repo(repo_id, repo_type="dataset")
            operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files]
            return self.api.create_commit(repo_id, operations, commit_message=message, repo_type="dataset").oid

    def create_branch(self, repo_id: str, branch: str, revision: str) -> None:
        """A new branch at `revision`.

        Raises:
            RegistryRefused: status 409 when a branch or tag of that name exists.
        """
        with self.errors(repo_id, revision):
            self.api.create_branch(repo_id, branch=branch, revision=revision)

    def commit_file(self, repo_id: str, branch: str, path: str, data: bytes, message: str,
                    parent_commit: str | None = None) -> str:
        """Commit one file (`data` at `path`) to `branch`; with `parent_commit`, only while the branch
        is still at that commit (a compare-and-swap). Returns the new commit.

        Raises:
            RegistryRefused: status 412 when `branch` has moved on from `parent_commit`.
        """
        from huggingface_hub import CommitOperationAdd

        with self.errors(repo_id, branch):
            return self.api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)],
                                          commit_message=message, revision=branch, parent_commit=parent_commit).oid

    def subscribe(self, url: str, namespaces: list[str], secret: str) -> str:
        """A webhook owned by the token's user, told of every change to the refs of the repos in
        `namespaces` (users or organisations: the embedded registry matches either by name),
        its deliveries signed with `secret` (`hub.signing`); its id.

        Raises:
            RegistryRefused: the registry has no webhooks, or refused this one (with its reason).
        """
        with self.errors("(webhooks)"):
            return self.api.create_webhook(url=url, watched=[{"type": "user", "name": n} for n in namespaces],
                                           domains=["repo"], secret=secret).id

    def unsubscribe(self, webhook: str) -> None:
        with self.errors("(webhooks)"):
            self.api.delete_webhook(webhook)

    def _create_repo(self, repo_id: str, **kwargs):
        """Only a missing repo is created: create_repo(exist_ok=True) answers a read-only token's 403
        with a URL it parses against the import-time HF_ENDPOINT, which the registry's URL does not change."""
        return self.api.create_repo(repo_id, **kwargs)

    def move_tag(self, repo_id: str, tag: str, current: str | None, commit: str, message: str) -> None:
        """Point `tag` (at `current` now, or nowhere) at `commit`. A Hub tag cannot be moved in
        place: it is deleted and made again, and put back where it was if making it again fails."""
        with self.errors(repo_id, tag):
            if current:
                self.api.delete_tag(repo_id, tag=tag)
            try:
                self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
            except BaseException:
                if current:
                    self.api.create_tag(repo_id, tag=tag, revision=current, tag_message="restored: a move failed")
                raise

    def check_parent_base(self, folder: Path) -> None:
        """Refuse an adapter continued from a parent (`parent` in its run_config.yaml) whose base model
        differs from the parent's: the parent's own adapter_config.json in the registry at the recorded
        commit when the parent is a registry adapter, else the base recorded for it at training time.

        Raises:
            LoradockError: naming both bases; nothing is pushed.
        """
        info = CardInfo.from_folder(folder)
        parent = info.parent if isinstance(info.parent, dict) else None
        if not parent:
            return
        parent_base, where = parent.get("base_model"), "recorded for it in run_config.yaml"
        if parent.get("repo_id") and parent.get("commit"):
            found = self.files(parent["repo_id"], parent["commit"], (CONFIG,))
            if found is None:
                raise LoradockError(f"{folder} names its parent {parent['repo_id']}@{parent['commit']}, which has no "
                                    f"{CONFIG} at {self.url}; nothing was pushed",
                                    "push to the registry that holds the parent, or train the adapter again from a "
                                    "parent in this registry (--init-adapter)")
            parent_base = read_json(found / CONFIG).get("base_model_name_or_path")
            where = f"in {parent['repo_id']}@{parent['commit'][:12]}'s {CONFIG}"
        if parent_base and parent_base != info.base_model:
            parent_name = parent.get("repo_id") or "its local parent"
            raise LoradockError(f"{folder} is for base model {info.base_model!r} but its parent {parent_name} is for "
                                f"{parent_base!r} ({where}); an adapter continued from another base's weights is not "
                                "that parent's child; nothing was pushed",
                                "train the child from a parent of the same base (loradock train --init-adapter "
                                "PARENT --base-model BASE), or push it as a fresh adapter trained without "
                                "--init-adapter")

    # --- pulling ---

    def pull(self, spec: "str | AdapterRef", to: str | Path | None = None) -> PullResult:
        """Download a pinned snapshot, checking every file against the registry's hashes as it arrives
        (sha256 for LFS files, git blob sha1 for the rest), then move it into place in one rename.

        The registry's answer is not trusted to be well formed: a commit that is not a sha, a file name
        that would land outside the folder (or on the pull marker), a file without a size, and a
        download longer than its size are refused, and nothing is kept.
        """
        from hub.transfer import download_file

        ref = spec if isinstance(spec, AdapterRef) else AdapterRef.parse(spec)
        repo_id, revision, endpoint = ref.repo_id, ref.revision, self.url
        with self.errors(repo_id, revision):
            info = self.api.model_info(repo_id, revision=revision, files_metadata=True)  # sizes and hashes
        sha, files = checked_listing(info, endpoint, f"{repo_id}@{revision}")
        dest = Path(to) if to else home() / "pulled" / repo_id / sha
        if pulled_sha(dest) == sha:
            return PullResult(repo_id, revision, sha, dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise LoradockError(f"{dest} already exists and holds something else", "pass --to an empty or new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pulling-"))
        try:
            targets = [(f, staged_path(staging, f.rfilename, endpoint, f"{repo_id}@{revision}")) for f in files]
            with ThreadPoolExecutor(max_workers=8) as pool:
                results = pool.map(lambda job: (job[0], *download_file(endpoint, self.token, repo_id, sha, *job)),
                                   targets)
                for f, actual, expected in results:
                    if actual != expected:
                        raise LoradockError(f"{f.rfilename} is corrupt: its hash is {actual}, the registry records "
                                            f"{expected}; nothing was kept",
                                            "pull again; if it persists, the registry's copy is damaged")
            (staging / PULL_MARKER).write_text(json.dumps({"repo_id": repo_id, "revision": revision, "commit": sha}))
            move_into_place(staging, dest, sha)
        except urllib.error.HTTPError as e:
            raise LoradockError(f"downloading {repo_id}@{revision} failed: the registry answered {e.code} "
                                f"{e.headers.get('X-Error-Message') or e.reason}; nothing was kept",
                                "pull again") from None
        except (TimeoutError, urllib.error.URLError) as e:  # urllib's silence, or a connection that failed
            from hub.timeouts import READ_S

            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            problem = (f"the registry at {endpoint} did not answer within {READ_S:g} s"
                       if isinstance(reason, TimeoutError) else f"cannot reach the registry at {endpoint} ({reason})")
            raise Unreachable(f"{problem} while {repo_id}@{revision} was downloading; nothing was kept",
                              SILENT_FIX) from None
        except OSError as e:
            raise LoradockError(f"downloading {repo_id}@{revision} failed: {e}; nothing was kept",
                                "pull again") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return PullResult(repo_id, revision, sha, dest)


_SHARED: dict[tuple[str, str | None], Registry] = {}
_SHARED_LOCK = threading.Lock()


def registry(url: str | None = None, token: str | None = None) -> Registry:
    """The process's `Registry` for `url` and `token` (each resolved as `Registry` resolves them):
    built on first use, then shared by every caller."""
    resolved = endpoint_url(url)
    key = (resolved, token_for(resolved, token))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Registry(*key)
        return _SHARED[key]


def public_model_files(name: str, patterns: list[str]) -> Path:
    """The files of a model named on the public Hub (huggingface.co, or the Hub HF_ENDPOINT names),
    matching `patterns`: from the Hub cache, downloaded into it when missing."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=patterns))


def quiet_progress_bars() -> None:
    """No progress bars from huggingface_hub in this process (for output that goes to a log)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def check_model_folder(folder: Path, max_file_size: int) -> list[tuple[str, Path]]:
    if not (folder / "config.json").exists():
        raise LoradockError(f"{folder} is not a model folder: there is no config.json", "pass a save_pretrained folder")
    files = folder_files(folder, max_file_size)
    if not any(rel.endswith(".safetensors") for rel, _ in files):
        raise LoradockError(f"{folder} has no .safetensors weights", "save the model with safe_serialization=True")
    return files
