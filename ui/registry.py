"""What the registry knows, for the comparison screen: the adapters of a base model that the
endpoint can hot-load (by name, by tag, each with its commit sha), and an adapter's card: base
model, rank, dataset sha, training configuration, eval metrics and the training loss curve.

Raises loradock's typed errors (`Unreachable`, `NotFound`, ...) like the rest of hub/.
"""

from dataclasses import dataclass, field

from hub.adapter import CONFIG, METRICS, RUN_CONFIG, AdapterRef
from hub.adapter.card import CardInfo
from hub.adapter.records import RunRecord
from hub.client import Registry

CARD_FILES = (CONFIG, METRICS, RUN_CONFIG)


@dataclass
class RegistryAdapter:
    name: str  # what the endpoint is sent as `model`: repo_id or repo_id@tag
    commit: str


def hot_loadable(base_model: str, registry: Registry) -> list[RegistryAdapter]:
    """Every adapter of `base_model` in the registry: its main branch and each of its tags."""
    # huggingface_hub retries a refused connection for ~20 s: the screen must not hang that long.
    registry.check_reachable(timeout=3, fix="start it with `loradock hub serve`, or pass `loradock ui --registry URL`")
    options = []
    for listed in registry.list_adapters(base_model=base_model):
        options.append(RegistryAdapter(listed.repo_id, listed.commit))
        options += [RegistryAdapter(str(AdapterRef(listed.repo_id, tag)), sha) for tag, sha in listed.tags.items()]
    return options


@dataclass
class AdapterCard:
    repo_id: str
    commit: str
    card: CardInfo | None  # rebuilt from the files, as the registry holds them at `commit`
    run: RunRecord
    run_config_yaml: str
    loss_curve: list[dict] = field(default_factory=list)  # {"step", "loss", "series": "train"|"eval"}

    @property
    def summary(self) -> dict:
        card = self.card or CardInfo(None, None, {})
        targets = card.settings.get("target_modules") or []
        return {"repo": self.repo_id, "commit": self.commit, "base model": card.base_model,
                "base model revision": card.base_model_revision, "method": card.method, "rank": card.rank,
                "alpha": card.settings.get("alpha"),
                "target modules": targets if isinstance(targets, str) else ", ".join(targets),
                "dataset sha256": card.dataset_sha256, "eval loss before": self.run.eval_loss_before,
                "eval loss": self.run.eval_loss, "steps": self.run.steps}


def adapter_card(repo_id: str, commit: str, registry: Registry) -> AdapterCard:
    """The card of `repo_id` at `commit`, read from the registry (the files land in the Hub cache)."""
    # An adapter pushed without loradock may lack metrics.json or run_config.yaml.
    folder = registry.files(repo_id, commit, CARD_FILES)
    if folder is None:
        return AdapterCard(repo_id, commit, None, RunRecord(), "")
    run = RunRecord.read(folder)
    run_config = folder / RUN_CONFIG
    return AdapterCard(repo_id, commit, CardInfo.from_folder(folder), run,
                       run_config.read_text(encoding="utf-8") if run_config.exists() else "", loss_curve(run))


def loss_curve(run: RunRecord) -> list[dict]:
    """The train and eval losses of the Trainer's log_history, one point per logged step."""
    points = []
    for entry in run.log_history:
        for key, series in (("loss", "train"), ("eval_loss", "eval")):
            if isinstance(entry.get(key), (int, float)) and "step" in entry:
                points.append({"step": entry["step"], "loss": entry[key], "series": series})
    return points
