"""Model cards for every hf-kan model family, written by ``save_pretrained`` and ``push_to_hub``.

A card is a ``README.md``: YAML front matter (``library_name: transformers``, ``pipeline_tag``, ``tags``,
``license``, optional ``base_model``, ``datasets`` and ``model-index`` metrics) followed by a Markdown
body rendered from the template ``model_cards/<model_type>.md`` (installed as ``hf_kan.model_cards``),
falling back to ``model_cards/default.md``. A new family only adds its template.

What the card says about a checkpoint (where it was converted from, its base model, measured metrics)
lives in ``config.model_card_info`` (a plain dict saved with the config, so it survives
``save_pretrained`` / ``from_pretrained``); set it with :func:`set_model_card_info`.

Templates use :class:`string.Template` placeholders (``${name}``); the variables are:

=====================  =======================================================================
``title``              model name (``model_name`` in the card info, else the directory / repo name)
``model_type``         ``config.model_type``
``architecture``       the model class, e.g. ``KATForImageClassification``
``repo_id``            where to load it from (Hub repo id, or a placeholder path)
``num_parameters``     parameter count, e.g. ``5,718,328``
``config_table``       Markdown table of the family's own config fields
``usage``              a Python snippet loading the model with the Auto classes
``provenance``         converted-from / base-model / training sentence(s)
``metrics_table``      Markdown table of the recorded metrics (or a sentence saying there are none)
``hf_kan_version``     the hf-kan version that wrote the card
``license``            the license identifier
=====================  =======================================================================
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import tempfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from transformers import PreTrainedConfig
from transformers.utils import logging

from .errors import HFKanConfigError

logger = logging.get_logger(__name__)

CARD_INFO_ATTR = "model_card_info"
CARD_INFO_KEYS = (
    "model_name",
    "base_model",
    "converted_from",
    "datasets",
    "metrics",
    "metrics_dataset",
    "metrics_source",
    "metrics_source_url",
    "license",
    "tags",
    "training",
)
DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TAGS = {"ImageClassification": "image-classification"}
_SKIP_CONFIG_FIELDS = {"model_card_info"}


def set_model_card_info(config_or_model: Any, **info: Any) -> dict[str, Any]:
    """Merge ``info`` into ``config.model_card_info`` (the metadata the model card is rendered from).

    Keys: ``model_name``; ``base_model`` (a Hub repo id); ``converted_from`` (file or URL of the original
    checkpoint); ``datasets`` (list of dataset names); ``metrics`` (``{name: value}``); ``metrics_dataset``
    (the dataset the metrics were measured on); ``metrics_source`` (who measured them, e.g.
    ``"reported by the authors"``) and ``metrics_source_url``; ``license``; ``tags`` (extra tags);
    ``training`` (a free-text sentence).
    Returns the merged dict. Unknown keys raise :class:`HFKanConfigError`.
    """
    config = getattr(config_or_model, "config", config_or_model)
    unknown = sorted(set(info) - set(CARD_INFO_KEYS))
    if unknown:
        raise HFKanConfigError(f"unknown model-card keys {unknown}; valid keys are {list(CARD_INFO_KEYS)}")
    merged = dict(getattr(config, CARD_INFO_ATTR, None) or {})
    merged.update({k: v for k, v in info.items() if v is not None})
    setattr(config, CARD_INFO_ATTR, merged)
    return merged


def load_template(model_type: str) -> str:
    """Text of ``model_cards/<model_type>.md`` from the installed ``hf_kan.model_cards``, else ``default.md``."""
    cards = resources.files("hf_kan.model_cards")
    path = cards / f"{model_type}.md"
    if not path.is_file():
        path = cards / "default.md"
    return path.read_text(encoding="utf-8")


def _own_config_fields(config: PreTrainedConfig) -> list[tuple[str, Any]]:
    """The fields the config class (and its PreTrainedConfig subclasses) declares, not the ones every config has."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    rows: list[tuple[str, Any]] = []
    for cls in reversed(type(config).__mro__):
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedConfig)) or cls is PreTrainedConfig:
            continue
        for name in cls.__dict__.get("__annotations__", {}):
            if name in base or name.startswith("_") or name in _SKIP_CONFIG_FIELDS or not hasattr(config, name):
                continue
            if name not in (r[0] for r in rows):
                rows.append((name, getattr(config, name)))
    return rows


def _config_table(config: PreTrainedConfig) -> str:
    rows = _own_config_fields(config)
    if getattr(config, "num_labels", None) is not None:
        rows.append(("num_labels", config.num_labels))
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| `{name}` | `{value!r}` |" for name, value in rows]
    return "\n".join(lines)


def _metrics_table(info: dict[str, Any]) -> str:
    metrics = info.get("metrics") or {}
    if not metrics:
        return "No evaluation results are recorded for this checkpoint."
    dataset = info.get("metrics_dataset", "-")
    source = info.get("metrics_source", "measured with hf-kan")
    lines = ["| metric | value | dataset | source |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {dataset} | {source} |" for name, value in metrics.items()]
    return "\n".join(lines)


def _provenance(info: dict[str, Any]) -> str:
    parts = []
    if info.get("converted_from"):
        parts.append(
            f"Converted with `hf-kan` from the original checkpoint `{info['converted_from']}`; the weights are "
            "unchanged, only renamed into the Transformers layout."
        )
    if info.get("base_model"):
        parts.append(f"Fine-tuned from [`{info['base_model']}`](https://huggingface.co/{info['base_model']}).")
    if info.get("training"):
        parts.append(str(info["training"]))
    if info.get("datasets"):
        parts.append("Datasets: " + ", ".join(f"`{d}`" for d in info["datasets"]) + ".")
    return "\n\n".join(parts) if parts else "Provenance of these weights was not recorded."


def _pipeline_tag(architecture: str) -> str | None:
    for suffix, tag in PIPELINE_TAGS.items():
        if architecture.endswith(suffix):
            return tag
    return None


def _front_matter(config: PreTrainedConfig, info: dict[str, Any], architecture: str, title: str) -> str:
    tags = ["hf-kan", config.model_type, "vision"]
    tags += [t for t in info.get("tags", []) if t not in tags]
    pipeline_tag = _pipeline_tag(architecture)
    eval_results = None
    metrics = info.get("metrics") or {}
    if metrics and pipeline_tag and info.get("metrics_dataset"):
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=str(info["metrics_dataset"]),
                dataset_name=str(info["metrics_dataset"]),
                metric_type=str(name),
                metric_value=value,
                # the Hub schema accepts a source only with its URL
                source_name=info.get("metrics_source") if info.get("metrics_source_url") else None,
                source_url=info.get("metrics_source_url"),
            )
            for name, value in metrics.items()
        ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        license=info.get("license", DEFAULT_LICENSE),
        base_model=info.get("base_model"),
        datasets=info.get("datasets"),
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )
    return "---\n" + data.to_yaml() + "\n---\n"


def _hf_kan_version() -> str:
    """The installed hf-kan version, read from the distribution metadata.

    Not ``hf_kan.__version__``: the modeling files import this module (for :class:`ModelCardMixin`), so it must
    not import the package that imports them back.
    """
    try:
        return importlib.metadata.version("hf-kan")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed as a package)"


def render_model_card(model: Any, repo_id: str | None = None) -> str:
    """Render the README.md of ``model`` (a ``PreTrainedModel``): front matter and the family's template body."""
    config = model.config
    info = dict(getattr(config, CARD_INFO_ATTR, None) or {})
    architecture = type(model).__name__
    title = info.get("model_name") or (repo_id.rsplit("/", 1)[-1] if repo_id else f"{config.model_type} model")
    location = repo_id or "path/to/this/model"
    usage = "\n".join(
        [
            "```python",
            "import hf_kan  # registers the hf-kan model types with the Auto classes",
            "from transformers import AutoModelForImageClassification",
            "",
            f'model = AutoModelForImageClassification.from_pretrained("{location}")',
            "```",
        ]
    )
    fields = {
        "title": title,
        "model_type": config.model_type,
        "architecture": architecture,
        "repo_id": location,
        "num_parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "config_table": _config_table(config),
        "usage": usage,
        "provenance": _provenance(info),
        "metrics_table": _metrics_table(info),
        "hf_kan_version": _hf_kan_version(),
        "license": info.get("license", DEFAULT_LICENSE),
    }
    body = Template(load_template(config.model_type)).safe_substitute(fields)
    return _front_matter(config, info, architecture, title) + body


def write_model_card(model: Any, save_directory: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``README.md`` for ``model`` into ``save_directory`` and return its path."""
    path = Path(save_directory) / "README.md"
    path.write_text(render_model_card(model, repo_id=repo_id), encoding="utf-8")
    return path


class ModelCardMixin:
    """Mixin for ``PreTrainedModel`` subclasses: ``save_pretrained`` and ``push_to_hub`` write a rendered README.md.

    Put it before ``PreTrainedModel`` in the bases. ``save_pretrained(..., model_card=False)`` skips the card.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, model_card: bool = True,
                        model_card_repo_id: str | None = None, **kwargs: Any) -> Any:
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if model_card and kwargs.get("is_main_process", True):
            write_model_card(self, save_directory, repo_id=model_card_repo_id)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """Upload weights, config and the rendered model card to the Hub repo ``repo_id`` (created if needed).

        Unlike the stock method, the README.md uploaded is the hf-kan card (see :func:`render_model_card`),
        with ``tags`` added to its front matter.
        """
        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if tags:
            set_model_card_info(self, tags=list(dict.fromkeys([*self._card_tags(), *tags])))
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size, model_card_repo_id=repo_id)
            return self._upload_modified_files(
                tmp_dir,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )

    def _card_tags(self) -> list[str]:
        return list((getattr(self.config, CARD_INFO_ATTR, None) or {}).get("tags", []))


__all__ = [
    "CARD_INFO_KEYS",
    "ModelCardMixin",
    "load_template",
    "render_model_card",
    "set_model_card_info",
    "write_model_card",
]
