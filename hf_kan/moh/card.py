"""The model card (``README.md``) of an MoH adapter: hf-kan's template ``model_cards/moh.md``, not PEFT's blank one.

Front matter: ``library_name: peft``, ``pipeline_tag: text-generation``, tags, license and, when the base model is a
Hub id, ``base_model``. Body: the method and its head split (:func:`moh_method_table`), how to load the adapter
(``AutoPeftModelForCausalLM`` and ``PeftModel.from_pretrained``), how it was trained and its validation / test
figures. The template's placeholders are those of hf-kan's other adapter cards (``title``, ``repo_id``,
``base_model_text``, ``num_parameters``, ``usage``, ``metrics_table``, ``citations``, ``hf_kan_version``,
``license``) plus ``method_table`` and ``training``.
"""

from __future__ import annotations

import os
from string import Template
from typing import Any

from huggingface_hub import ModelCardData

from ..hub import DEFAULT_LICENSE, load_template

MOH_CITATION = """```bibtex
@article{jin2024moh,
  title   = {MoH: Multi-Head Attention as Mixture-of-Head Attention},
  author  = {Peng Jin and Bo Zhu and Li Yuan and Shuicheng Yan},
  journal = {arXiv preprint arXiv:2410.11842},
  year    = {2024}
}
```"""
ROUTER_DESCRIPTIONS = {
    "query_norm": "`query_norm`: parameter-free; routed heads are scored by the L2 norm of their query (the "
    "continue-tuning router of MoH-LLaMA3); 0/1 gates with a straight-through gradient",
    "learned": "`learned`: two-stage router (softmax gates over the shared and over the top-k routed heads, mixed "
    "by a learned 2-way softmax) trained with a load-balance loss",
}


def _num_heads(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_attention_heads)


def moh_method_table(peft_config: Any, num_heads: int, num_wrapped: int) -> str:
    """Markdown table of an MoH adapter: router, head split and active-head ratio for ``num_heads`` heads per
    attention block, the wrapped modules, LoRA under MoH, load-balance weight."""
    shared, top_k = peft_config.head_split(num_heads)
    lora = peft_config.lora_config
    lora_text = "none (MoH parameters only)"
    if lora:
        targets = ", ".join(f"`{m}`" for m in sorted(lora["target_modules"]))
        lora_text = f"rank {lora['r']}, alpha {lora['lora_alpha']}, on {targets}"
    rows = [
        ("router", ROUTER_DESCRIPTIONS.get(peft_config.router, f"`{peft_config.router}`")),
        (
            "heads per attention block",
            f"{num_heads}: {shared} shared (always on) + top {top_k} of {num_heads - shared} routed",
        ),
        ("active heads per token", f"{shared + top_k} of {num_heads} ({(shared + top_k) / num_heads:.0%})"),
        (
            "wrapped modules",
            f"{num_wrapped} attention output projections "
            f"(`{', '.join(sorted(peft_config.target_modules or [])) or 'o_proj'}`), queries from "
            f"`{peft_config.query_module}`",
        ),
        ("LoRA under MoH", lora_text),
        ("load-balance weight", str(peft_config.load_balance_weight)),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _metrics_table(metrics: dict[str, Any]) -> str:
    lines = ["| split | LM loss | perplexity | blocks | |", "|---|---|---|---|---|"]
    lines.append(
        f"| validation ({metrics['validation_source']}) | {metrics['validation_loss']:.4f} | "
        f"{metrics['validation_perplexity']:.2f} | {metrics['validation_blocks']} | selected on this split |"
    )
    if metrics.get("test_loss") is not None:
        lines.append(
            f"| test ({metrics['test_source']}) | {metrics['test_loss']:.4f} | {metrics['test_perplexity']:.2f} | "
            f"{metrics['test_blocks']} | evaluated once, on the selected adapter |"
        )
    else:
        lines.append("| test | - | - | - | the data set has no test split |")
    return "\n".join(lines)


def render_adapter_card(peft_model: Any, *, args: Any, metrics: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md of the adapter of ``peft_model`` trained by ``hf-kan moh-tune`` (``args``: its
    ``MoHTuneArguments``, ``metrics``: what it returned)."""
    from .. import __version__
    from .layer import MoHLayer

    config = peft_model.peft_config["default"]
    base = config.base_model_name_or_path
    is_hub_id = bool(base) and not os.path.isabs(base) and not os.path.exists(base)
    base_text = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id else f"the base model `{base}`"
    location = repo_id or args.output_dir
    data = "the embedded corpus (`hf_kan/data/moh_corpus.txt`)" if args.dataset is None else f"`{args.dataset}`"
    if args.dataset is not None and args.data_files:
        data += f" (files `{args.data_files}`)"
    training = (
        f"Continue-tuned with `hf-kan moh-tune` on {data} for {metrics['steps']} optimizer steps "
        f"({metrics['num_processes']} process(es); AdamW, learning rate {args.learning_rate}, {args.batch_size} "
        f"blocks of {args.seq_len} tokens per process and step), loss = LM loss + `moh_aux_loss`. The adapter with "
        f"the lowest validation loss (step {metrics['best_step']}) was kept; the test split was evaluated once, on it."
    )
    usage = "\n".join([
        "```python",
        "import hf_kan  # registers PeftType.MOH with PEFT",
        "from peft import AutoPeftModelForCausalLM, PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")  # loads the base model too',
        "# or on a base model you load yourself:",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{location}")',
        "```",
    ])  # fmt: skip
    fields = {
        "title": repo_id.rsplit("/", 1)[-1] if repo_id else f"MoH adapter for {os.path.basename(str(base))}",
        "repo_id": location,
        "base_model_text": base_text,
        "num_parameters": f"{sum(p.numel() for p in peft_model.parameters() if p.requires_grad):,}",
        "method_table": moh_method_table(
            config,
            _num_heads(peft_model.get_base_model().config),
            sum(isinstance(m, MoHLayer) for m in peft_model.modules()),
        ),
        "usage": usage,
        "training": training,
        "metrics_table": _metrics_table(metrics),
        "citations": MOH_CITATION,
        "hf_kan_version": __version__,
        "license": DEFAULT_LICENSE,
    }
    front = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["hf-kan", "peft", "moh", "mixture-of-head"] + (["lora"] if config.lora_config else []),
        license=DEFAULT_LICENSE,
        base_model=base if is_hub_id else None,
    )
    return "---\n" + front.to_yaml() + "\n---\n" + Template(load_template("moh")).substitute(fields)


def write_adapter_card(peft_model: Any, output_dir: str, **kwargs: Any) -> str:
    """Write :func:`render_adapter_card` to ``output_dir/README.md`` (replacing PEFT's template); returns the path."""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_adapter_card(peft_model, **kwargs))
    return path


__all__ = ["moh_method_table", "render_adapter_card", "write_adapter_card"]
