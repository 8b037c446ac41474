"""Model cards and Hub uploads for everything hf-kan saves: KAT / KArAt models, patched VLMs, MoH (PEFT) adapters.

A card is a ``README.md``: YAML front matter (``library_name``, ``pipeline_tag``, ``tags``, ``license``, optional
``base_model``, ``datasets`` and ``model-index`` evaluation results that ``huggingface_hub.ModelCard`` parses)
followed by a Markdown body rendered from a template in ``model_cards/`` (installed as ``hf_kan.model_cards``):

- models: ``<model_type>.md`` (``kat.md``, ``karat.md``), else ``default.md``;
- vision-language models whose config carries an ``hf_kan`` patch section: ``patched_vlm.md``;
- PEFT adapters: ``<peft_type>.md`` (e.g. ``moh.md``), else ``peft_adapter.md``.

What the card says about a checkpoint (where it was converted from, its base model, measured metrics, evaluation
results) lives in ``config.model_card_info`` (a plain dict saved with the config, so it survives ``save_pretrained``
/ ``from_pretrained``); set it with :func:`set_model_card_info`. Results of ``hf_kan.eval`` become ``model-index``
entries through :func:`eval_results_from_runner`.

Templates use :class:`string.Template` placeholders (``${name}``). Every card gets ``title``, ``repo_id``,
``num_parameters``, ``usage`` (``pip install hf-kan``, then Python that imports ``hf_kan`` before loading),
``metrics_table``, ``citations`` (BibTeX of the methods the checkpoint uses, from ``model_cards/citations``),
``hf_kan_version`` and ``license``; models also ``model_type``, ``architecture``, ``config_table`` (the family's own
config fields) and ``provenance``; patched VLMs also ``active_patches`` and ``patches_table``; adapters also
``method``, ``peft_type``, ``base_model_text``, ``config_table`` (the adapter's config fields), ``method_table`` and
``training``. A PEFT method adds what only it knows through the ``fields`` of :func:`render_adapter_card` (MoH:
:mod:`hf_kan.moh.card`); this module imports no method.

Uploads: :func:`push_to_hub` (a model or adapter object, optionally with its processor) and :func:`push_directory`
(``hf-kan push DIR REPO_ID``, a saved directory, no weights loaded) write everything, card included, in ONE commit,
so no generic card is ever uploaded in between. A directory that already holds an hf-kan card (a trained model's or
adapter's, with its training and metrics sections) uploads that card, with evaluation results merged into it
(:func:`upload_card`); other directories get one rendered from their config. KAT / KArAt models also render their
card in ``save_pretrained`` and ``push_to_hub`` (:class:`ModelCardMixin`). A processor pushed later with the stock
``processor.push_to_hub`` keeps the hf-kan card: Transformers reloads the card already on the Hub and only adds tags.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
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
    "eval_results",
)
DEFAULT_LICENSE = "apache-2.0"
PIPELINE_TAGS = {"ImageClassification": "image-classification", "ForConditionalGeneration": "image-text-to-text",
                 "ImageTextToText": "image-text-to-text", "CausalLM": "text-generation"}
#: pipeline tag of an adapter card, from its PEFT config's ``task_type``
PEFT_PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation",
                      "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification",
                      "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction"}
#: where a card rendered without a repo id loads the checkpoint from; uploads put the repo id in its place
LOCAL_MODEL_LOCATION = "path/to/this/model"
LOCAL_ADAPTER_LOCATION = "path/to/this/adapter"
#: task type of evaluation results whose model has no pipeline tag
DEFAULT_EVAL_TASK_TYPE = "visual-question-answering"
#: runner metrics left out of model-index by default (they depend on the machine, not the model)
MACHINE_DEPENDENT_METRICS = ("prefill_seconds", "decode_seconds")
_SKIP_CONFIG_FIELDS = {"model_card_info"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATCH_CITATIONS = {"mma": ["aki"], "var": ["var"], "dyvte": ["dyvte"]}


def set_model_card_info(config_or_model: Any, **info: Any) -> dict[str, Any]:
    """Merge ``info`` into ``config.model_card_info`` (the metadata the model card is rendered from).

    Keys: ``model_name``; ``base_model`` (a Hub repo id); ``converted_from`` (file or URL of the original
    checkpoint); ``datasets`` (list of dataset names); ``metrics`` (``{name: value}``); ``metrics_dataset``
    (the dataset the metrics were measured on); ``metrics_source`` (who measured them, e.g.
    ``"reported by the authors"``) and ``metrics_source_url``; ``license``; ``tags`` (extra tags);
    ``training`` (a free-text sentence); ``eval_results`` (rows from :func:`eval_results_from_runner`).
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


def eval_results_from_runner(results: Iterable[Any], *, metrics: Sequence[str] | None = None,
                             exclude: Sequence[str] = MACHINE_DEPENDENT_METRICS) -> list[dict[str, Any]]:
    """Card rows from ``hf_kan.eval`` results: ``TaskResult`` objects, their ``as_dict()`` or the ``results`` list
    of the JSON that ``python -m hf_kan.eval.run --output-json`` writes.

    One row ``{"task", "split", "setting", "metric", "value", "num_samples"}`` per (result, metric): every metric of
    the result (task metric, per-group accuracies, efficiency means) unless ``metrics`` names the ones to keep;
    timings are left out (``exclude``). Pass the rows to ``set_model_card_info(model, eval_results=rows)`` or to
    ``push_to_hub`` / ``push_directory``; they become ``model-index`` entries (one per metric and patch setting,
    the setting in the entry's ``config`` and name).
    """
    rows = []
    for result in results:
        result = result.as_dict() if hasattr(result, "as_dict") else dict(result)
        setting = result.get("setting") or {}
        name = setting.get("name", "checkpoint") if isinstance(setting, dict) else str(setting)
        for metric, value in (result.get("metrics") or {}).items():
            if (metrics is not None and metric not in metrics) or metric in exclude:
                continue
            rows.append({"task": result["task"], "split": result.get("split"), "setting": name, "metric": metric,
                         "value": value, "num_samples": result.get("num_samples")})
    return rows


# ----------------------------------------------------------------------------------------------------- templates


def load_template(name: str, *fallbacks: str) -> str:
    """Text of the first of ``model_cards/<name>.md``, ``<fallback>.md`` ... that exists, else ``default.md``."""
    cards = resources.files("hf_kan.model_cards")
    for candidate in (name, *fallbacks):
        path = cards / f"{candidate}.md"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return (cards / "default.md").read_text(encoding="utf-8")


def citation(key: str) -> str:
    """BibTeX entry ``model_cards/citations/<key>.bib``."""
    return (resources.files("hf_kan.model_cards") / "citations" / f"{key}.bib").read_text(encoding="utf-8").strip()


def _citations_block(keys: Iterable[str]) -> str:
    keys = list(dict.fromkeys(keys))
    if not keys:
        return "No method papers apply to this checkpoint."
    return "```bibtex\n" + "\n\n".join(citation(k) for k in keys) + "\n```"


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


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| `{name}` | `{value!r}` |" for name, value in rows]
    return "\n".join(lines)


def _config_table(config: PreTrainedConfig) -> str:
    rows = _own_config_fields(config)
    if getattr(config, "num_labels", None) is not None:
        rows.append(("num_labels", config.num_labels))
    return _table(rows)


def _metrics_table(info: dict[str, Any]) -> str:
    metrics = info.get("metrics") or {}
    evals = info.get("eval_results") or []
    if not metrics and not evals:
        return "No evaluation results are recorded for this checkpoint."
    parts = []
    if metrics:
        dataset = info.get("metrics_dataset", "-")
        source = info.get("metrics_source", "measured with hf-kan")
        lines = ["| metric | value | dataset | source |", "|---|---|---|---|"]
        lines += [f"| {name} | {value} | {dataset} | {source} |" for name, value in metrics.items()]
        parts.append("\n".join(lines))
    if evals:
        parts.append(_eval_rows_table(evals))
    return "\n\n".join(parts)


def _eval_rows_table(rows: Iterable[dict[str, Any]]) -> str:
    lines = ["Measured with `hf_kan.eval` (one row per patch setting and metric):", "",
             "| task | split | patch setting | metric | value | samples |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r.get('split') or '-'} | `{r['setting']}` | {r['metric']} | {r['value']:.6g} | "
              f"{r.get('num_samples') or '-'} |" for r in rows]
    return "\n".join(lines)


def _provenance(info: dict[str, Any], missing: str = "Provenance of these weights was not recorded.") -> str:
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
    return "\n\n".join(parts) if parts else missing


def _pipeline_tag(architecture: str) -> str | None:
    for suffix, tag in PIPELINE_TAGS.items():
        if architecture.endswith(suffix):
            return tag
    return None


def _eval_result_objects(info: dict[str, Any], pipeline_tag: str | None) -> list[EvalResult]:
    out = []
    metrics = info.get("metrics") or {}
    if metrics and pipeline_tag and info.get("metrics_dataset"):
        out += [
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
    for row in info.get("eval_results") or []:
        out.append(EvalResult(
            task_type=pipeline_tag or DEFAULT_EVAL_TASK_TYPE, dataset_type=str(row["task"]),
            dataset_name=str(row["task"]), dataset_split=row.get("split"), metric_type=str(row["metric"]),
            metric_value=row["value"], metric_name=f"{row['metric']} ({row['setting']})",
            metric_config=str(row["setting"]),
        ))
    return out


def _front_matter(*, title: str, tags: list[str], info: dict[str, Any], pipeline_tag: str | None,
                  library_name: str, base_model: str | None = None) -> str:
    tags = list(dict.fromkeys([*tags, *info.get("tags", [])]))
    eval_results = _eval_result_objects(info, pipeline_tag) or None
    data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=tags,
        license=info.get("license", DEFAULT_LICENSE),
        base_model=base_model or info.get("base_model"),
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


def _install_then(python_lines: Iterable[str]) -> str:
    return "\n".join(["```bash", "pip install hf-kan", "```", "", "```python", *python_lines, "```"])


# ----------------------------------------------------------------------------------------------------- models


def _patch_section(config: PreTrainedConfig) -> dict[str, Any]:
    """The ``hf_kan`` patch section of a (vision-language) config, without its version (``{}`` when absent)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    section = getattr(text_config, "hf_kan", None) or {}
    return {k: v for k, v in section.items() if k != "version" and v is not None}


def _patch_citations(section: dict[str, Any]) -> list[str]:
    keys = []
    for name, options in section.items():
        keys += _PATCH_CITATIONS.get(name, [])
        if name == "prune":
            scorer = str((options or {}).get("scorer", "fastv"))
            keys.append("pdrop" if scorer.startswith("pdrop") else "fastv")
            if (options or {}).get("debias"):
                keys.append("debias")
    return keys


def _patches_table(section: dict[str, Any]) -> str:
    lines = ["| patch | option | value |", "|---|---|---|"]
    for name, options in section.items():
        for key, value in (options or {}).items():
            lines.append(f"| `{name}` | `{key}` | `{json.dumps(value)}` |")
    return "\n".join(lines)


def render_config_card(config: PreTrainedConfig, *, architecture: str, num_parameters: int,
                       repo_id: str | None = None, extra_info: dict[str, Any] | None = None) -> str:
    """The README.md of a model with ``config``, class name ``architecture`` and ``num_parameters`` parameters (what
    :func:`render_model_card` and :func:`push_directory` use; no weights needed). ``extra_info`` is merged over the
    config's ``model_card_info``."""
    info = {**(getattr(config, CARD_INFO_ATTR, None) or {}), **(extra_info or {})}

    title = info.get("model_name") or (repo_id.rsplit("/", 1)[-1] if repo_id else f"{config.model_type} model")
    location = repo_id or LOCAL_MODEL_LOCATION
    section = _patch_section(config)
    fields = {
        "title": title,
        "model_type": config.model_type,
        "architecture": architecture,
        "repo_id": location,
        "num_parameters": f"{num_parameters:,}",
        "provenance": _provenance(info),
        "metrics_table": _metrics_table(info),
        "hf_kan_version": _hf_kan_version(),
        "license": info.get("license", DEFAULT_LICENSE),
    }
    tags = ["hf-kan", config.model_type]
    if section:
        template = load_template("patched_vlm")
        tags += ["vision-language", *[f"hf-kan-{name}" for name in section]]
        fields.update(
            active_patches=", ".join(f"`{name}`" for name in section),
            patches_table=_patches_table(section),
            citations=_citations_block(_patch_citations(section)),
            usage=_install_then([
                "import hf_kan  # registers the \"hf_kan\" attention implementation and the patches",
                "from hf_kan import patches",
                "from transformers import AutoModelForImageTextToText, AutoProcessor",
                "",
                f'model = patches.from_pretrained(AutoModelForImageTextToText, "{location}")',
                f'processor = AutoProcessor.from_pretrained("{location}")',
                "print(patches.status(model))  # the active patches and their options",
            ]),
        )
    else:
        template = load_template(config.model_type)
        tags.append("vision")
        fields.update(
            config_table=_config_table(config),
            citations=_citations_block([]),
            usage=_install_then([
                "import hf_kan  # registers the hf-kan model types with the Auto classes",
                "from transformers import AutoImageProcessor, AutoModelForImageClassification",
                "",
                f'model = AutoModelForImageClassification.from_pretrained("{location}")',
                f'image_processor = AutoImageProcessor.from_pretrained("{location}")',
            ]),
        )
    body = Template(template).safe_substitute(fields)
    return _front_matter(title=title, tags=tags, info=info, pipeline_tag=_pipeline_tag(architecture),
                         library_name="transformers") + body


def render_model_card(model: Any, repo_id: str | None = None, *, extra_info: dict[str, Any] | None = None) -> str:
    """Render the README.md of ``model`` (a ``PreTrainedModel``): front matter and the family's template body."""
    return render_config_card(model.config, architecture=type(model).__name__,
                              num_parameters=sum(p.numel() for p in model.parameters()), repo_id=repo_id,
                              extra_info=extra_info)


def write_model_card(model: Any, save_directory: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``README.md`` for ``model`` into ``save_directory`` and return its path."""
    path = Path(save_directory) / "README.md"
    path.write_text(render_model_card(model, repo_id=repo_id), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------- adapters


def _adapter_config_dict(peft_config: Any) -> dict[str, Any]:
    """A PEFT config (``PeftConfig`` or the dict of its ``adapter_config.json``) as a plain dict."""
    return dict(peft_config.to_dict() if hasattr(peft_config, "to_dict") else peft_config)


def _citation_keys_available(keys: Iterable[str]) -> list[str]:
    cards = resources.files("hf_kan.model_cards") / "citations"
    return [key for key in keys if (cards / f"{key}.bib").is_file()]


def render_adapter_card(peft_config: Any, *, num_parameters: int, repo_id: str | None = None,
                        extra_info: dict[str, Any] | None = None, fields: dict[str, str] | None = None) -> str:
    """The README.md of a PEFT adapter with config ``peft_config`` (a ``PeftConfig`` such as ``MoHConfig``, or the
    dict read from ``adapter_config.json``) and ``num_parameters`` adapter parameters.

    Template ``<peft_type>.md`` (lower case), else ``peft_adapter.md``. The front matter (``library_name: peft``,
    ``pipeline_tag`` from the config's ``task_type``, tags, ``base_model`` when it is a Hub id, ``model-index`` from
    ``extra_info``), the usage, the citation (``model_cards/citations/<peft_type>.bib`` when it exists) and the
    adapter's config table are rendered here. ``extra_info`` takes the keys of :func:`set_model_card_info`.
    ``fields`` fills or overrides template placeholders with what only the method knows (the MoH trainer passes
    ``method_table``, ``training`` and ``metrics_table``); without them ``method_table`` points to the config table
    and ``training`` says what ``extra_info`` records.
    """
    info = dict(extra_info or {})
    config = _adapter_config_dict(peft_config)
    peft_type = str(getattr(config["peft_type"], "value", config["peft_type"]))
    task_type = config.get("task_type")
    task_type = str(getattr(task_type, "value", task_type)) if task_type else None
    base = config.get("base_model_name_or_path")
    hub_base = base if base and _HUB_ID.match(str(base)) and not os.path.exists(str(base)) else None
    title = info.get("model_name") or (repo_id.rsplit("/", 1)[-1] if repo_id else f"{peft_type.lower()} adapter")
    location = repo_id or LOCAL_ADAPTER_LOCATION
    rows = [(k, v) for k, v in sorted(config.items())
            if k not in ("peft_type", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode")]
    base_text = f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else (
        f"the base model `{base}`" if base else "its base model")
    config_table = _table(rows)
    values = {
        "title": title,
        "repo_id": location,
        "method": peft_type,
        "peft_type": peft_type,
        "base_model_text": base_text,
        "num_parameters": f"{num_parameters:,}",
        "config_table": config_table,
        "method_table": "The adapter's settings are listed under *Adapter configuration* below.",
        "training": _provenance(info, missing="How this adapter was trained was not recorded."),
        "metrics_table": _metrics_table(info),
        "citations": _citations_block(_citation_keys_available([peft_type.lower()])),
        "hf_kan_version": _hf_kan_version(),
        "license": info.get("license", DEFAULT_LICENSE),
        "usage": _install_then([
            "import hf_kan  # registers the hf-kan PEFT methods (PeftType.MOH); import it before loading the adapter",
            "from peft import AutoPeftModelForCausalLM, PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")  # loads the base model too',
            "# or on a base model you load yourself:",
            f'base = AutoModelForCausalLM.from_pretrained("{base or "path/to/the/base/model"}")',
            f'model = PeftModel.from_pretrained(base, "{location}")',
        ]),
        **(fields or {}),
    }
    body = Template(load_template(peft_type.lower(), "peft_adapter")).safe_substitute(values)
    tags = ["hf-kan", "peft", peft_type.lower()]
    return _front_matter(title=title, tags=tags, info=info, pipeline_tag=PEFT_PIPELINE_TAGS.get(task_type or ""),
                         library_name="peft", base_model=hub_base) + body


# ----------------------------------------------------------------------------------------------------- directories


def _safetensors_parameters(files: Iterable[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def render_directory_card(directory: str | os.PathLike, repo_id: str | None = None, *,
                          eval_results: Sequence[dict[str, Any]] | None = None) -> str:
    """The README.md of a saved model or adapter directory, from its ``config.json`` / ``adapter_config.json`` and
    the tensor shapes in its safetensors files (no weights are loaded). ``eval_results`` (rows of
    :func:`eval_results_from_runner`) are added to the card's evaluation results."""
    directory = Path(directory)
    extra = {"eval_results": list(eval_results)} if eval_results else {}
    if (directory / "adapter_config.json").is_file():
        # read as JSON, not through PeftConfig: no method (MoH) needs to be imported to describe its adapter
        peft_config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        params = _safetensors_parameters(sorted(directory.glob("adapter_model*.safetensors")))
        return render_adapter_card(peft_config, num_parameters=params, repo_id=repo_id, extra_info=extra)
    if not (directory / "config.json").is_file():
        raise HFKanConfigError(f"{directory} holds neither config.json nor adapter_config.json: nothing to describe")
    from transformers import AutoConfig

    # kat / karat are registered with AutoConfig by ``import hf_kan`` (hf_kan._registration), which ran before this
    # module: importing hf_kan.models here would close an import cycle (the modeling files import this module)
    config = AutoConfig.from_pretrained(str(directory))
    if extra.get("eval_results"):
        earlier = (getattr(config, CARD_INFO_ATTR, None) or {}).get("eval_results") or []
        extra["eval_results"] = [*earlier, *extra["eval_results"]]
    architecture = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "Model")])[0]
    params = _safetensors_parameters(sorted(directory.glob("*.safetensors")))
    return render_config_card(config, architecture=architecture, num_parameters=params, repo_id=repo_id,
                              extra_info=extra)


def saved_card(directory: str | os.PathLike) -> Any | None:
    """The ``huggingface_hub.ModelCard`` in ``directory/README.md`` if it is an hf-kan card (its front matter tags
    ``hf-kan``), else ``None`` (no README, PEFT's or Transformers' generic one, or unreadable front matter)."""
    import yaml
    from huggingface_hub import ModelCard

    path = Path(directory) / "README.md"
    if not path.is_file():
        return None
    try:
        card = ModelCard.load(path)
    except (ValueError, yaml.YAMLError):
        return None
    return card if "hf-kan" in (card.data.tags or []) else None


def _eval_key(result: EvalResult) -> tuple:
    return (result.task_type, result.dataset_type, result.dataset_split, result.metric_type, result.metric_config)


def _add_to_evaluation_section(text: str, block: str) -> str:
    """``text`` (a card body) with ``block`` at the end of its ``## Evaluation`` section (replacing the sentence
    saying there are no results), or as a new section at the end."""
    text = text.replace("No evaluation results are recorded for this checkpoint.\n\n", "")
    start = text.find("\n## Evaluation\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n## Evaluation\n\n" + block + "\n"
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end
    return text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:]


def update_saved_card(card: Any, repo_id: str, *,
                      eval_results: Sequence[dict[str, Any]] | None = None) -> str:
    """README.md text of a saved hf-kan ``card`` (a ``ModelCard``, see :func:`saved_card`) for upload to ``repo_id``:
    its body kept as it is (a trained card's training and metrics sections, any hand edits), the local placeholder
    locations in its usage code replaced by ``repo_id``, and ``eval_results`` (rows of
    :func:`eval_results_from_runner`) merged into its ``model-index`` (replacing earlier results of the same task,
    split, metric and patch setting) and added to its Evaluation section."""
    text = card.text
    for placeholder in (LOCAL_MODEL_LOCATION, LOCAL_ADAPTER_LOCATION):
        text = text.replace(f'"{placeholder}"', f'"{repo_id}"')
    if eval_results:
        new = _eval_result_objects({"eval_results": list(eval_results)}, card.data.pipeline_tag)
        keys = {_eval_key(r) for r in new}
        card.data.eval_results = [r for r in card.data.eval_results or [] if _eval_key(r) not in keys] + new
        if not card.data.model_name:  # model-index entries need a name
            heading = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
            card.data.model_name = heading.group(1).strip() if heading else repo_id.rsplit("/", 1)[-1]
        text = _add_to_evaluation_section(text, _eval_rows_table(eval_results))
    card.text = text
    return card.content


def upload_card(directory: str | os.PathLike, repo_id: str, *,
                eval_results: Sequence[dict[str, Any]] | None = None) -> str:
    """The README.md that :func:`push_directory` uploads for ``directory``: its own hf-kan card, updated by
    :func:`update_saved_card`, when it has one (what ``save_pretrained`` of a KAT / KArAt model, ``hf-kan train``
    and ``hf-kan moh-tune`` wrote); else the card :func:`render_directory_card` renders from its config."""
    card = saved_card(directory)
    if card is None:
        return render_directory_card(directory, repo_id=repo_id, eval_results=eval_results)
    return update_saved_card(card, repo_id, eval_results=eval_results)


def _repo_files(directory: Path) -> list[tuple[str, Path]]:
    """(path in repo, file) of every file under ``directory`` except README.md and hidden files / folders."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root, name)
            rel = path.relative_to(directory).as_posix()
            if name.startswith(".") or rel == "README.md":
                continue
            out.append((rel, path))
    return out


def push_directory(directory: str | os.PathLike, repo_id: str, *, eval_results: Sequence[dict[str, Any]] | None = None,
                   card: str | None = None, private: bool | None = None, token: bool | str | None = None,
                   revision: str | None = None, commit_message: str | None = None, create_pr: bool = False) -> Any:
    """Upload the saved model / adapter ``directory`` to the Hub repo ``repo_id`` (created if needed) in one commit,
    with its hf-kan card as README.md (:func:`upload_card`: the directory's own hf-kan card, ``eval_results`` merged
    in, else one rendered from its config; or ``card``). Returns the ``CommitInfo``.

    The Hub is ``HF_ENDPOINT`` (default huggingface.co); ``token`` defaults to the logged-in token.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    directory = Path(directory)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    text = card if card is not None else upload_card(directory, repo_id, eval_results=eval_results)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in
                  _repo_files(directory)]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode("utf-8")))
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    return api.create_commit(repo_id=repo_id, operations=operations, token=token, revision=revision,
                             create_pr=create_pr, commit_message=commit_message or "Upload with hf-kan")


def push_to_hub(obj: Any, repo_id: str, *, processor: Any = None,
                eval_results: Sequence[dict[str, Any]] | None = None, max_shard_size: int | str = "50GB",
                **push_kwargs: Any) -> Any:
    """Upload a KAT / KArAt model, a patched vision-language model or a PEFT (MoH) adapter, its ``processor``
    (image processor, tokenizer or multimodal processor; optional) and its hf-kan card in ONE commit.

    ``obj`` is saved with ``save_pretrained`` into a temporary directory (a patched VLM's config carries its
    ``hf_kan`` section, DyVTE routers are in its weights) and uploaded with :func:`push_directory`, which takes
    ``private``, ``token``, ``revision``, ``commit_message`` and ``create_pr``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(obj, "peft_config"):
            obj.save_pretrained(tmp)
        else:
            obj.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        # rendered afresh from the object's config (titled after repo_id), not kept from what save_pretrained wrote
        Path(tmp, "README.md").unlink(missing_ok=True)
        return push_directory(tmp, repo_id, eval_results=eval_results, **push_kwargs)


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
        image_processor: Any = None,
    ) -> Any:
        """Upload weights, config, the rendered model card and (optional) ``image_processor`` to the Hub repo
        ``repo_id`` (created if needed), in one commit.

        Unlike the stock method, the README.md uploaded is the hf-kan card (see :func:`render_model_card`),
        with ``tags`` added to its front matter.
        """
        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if tags:
            set_model_card_info(self, tags=list(dict.fromkeys([*self._card_tags(), *tags])))
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size, model_card_repo_id=repo_id)
            if image_processor is not None:
                image_processor.save_pretrained(tmp_dir)
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


# ----------------------------------------------------------------------------------------------------- command line


def _push_command(args: Any) -> int:
    rows = []
    for path in args.eval_results or []:
        with open(path) as handle:
            payload = json.load(handle)
        rows += eval_results_from_runner(payload["results"] if isinstance(payload, dict) else payload)
    info = push_directory(args.directory, args.repo_id, eval_results=rows, private=args.private or None,
                          token=args.token, revision=args.revision, commit_message=args.commit_message,
                          create_pr=args.create_pr)
    print(getattr(info, "commit_url", info))
    return 0


def add_subparser(subparsers: Any) -> None:
    """``hf-kan push DIR REPO_ID``: upload a saved model / adapter directory with its hf-kan card."""
    parser = subparsers.add_parser(
        "push", help="upload a saved hf-kan model, patched VLM or MoH adapter with its model card",
        description="Upload a saved model directory (KAT, KArAt, a patched vision-language model) or PEFT adapter "
                    "directory (MoH) to the Hugging Face Hub in one commit, with its hf-kan README.md: the one "
                    "saved in the directory (hf-kan train, moh-tune, save_pretrained), with --eval-results merged "
                    "in, else one rendered from its config (what it is, how to install and load it, active "
                    "patches, evaluation results, citations). "
                    "The Hub is $HF_ENDPOINT (default huggingface.co).")
    parser.add_argument("directory", help="the saved directory (save_pretrained output)")
    parser.add_argument("repo_id", help="target repository, e.g. user/name (created if needed)")
    parser.add_argument("--eval-results", action="append", metavar="JSON",
                        help="results of `python -m hf_kan.eval.run --output-json` to add to the card (repeatable)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.set_defaults(func=_push_command)


__all__ = [
    "CARD_INFO_KEYS",
    "ModelCardMixin",
    "citation",
    "eval_results_from_runner",
    "load_template",
    "push_directory",
    "push_to_hub",
    "render_adapter_card",
    "render_config_card",
    "render_directory_card",
    "render_model_card",
    "saved_card",
    "set_model_card_info",
    "update_saved_card",
    "upload_card",
    "write_model_card",
]
