"""The model card (``README.md``) of an MoH adapter: hf-kan's template ``model_cards/moh.md``, not PEFT's blank one.

Front matter: ``library_name: peft``, ``pipeline_tag: text-generation``, tags, license and, when the base model is a
Hub id, ``base_model``. Body: the method and its head split, how to load the adapter (``AutoPeftModelForCausalLM``
and ``PeftModel.from_pretrained``), how it was trained and its validation / test figures.
"""

from __future__ import annotations

import os
from string import Template
from typing import Any

from huggingface_hub import ModelCardData

from ..hub import DEFAULT_LICENSE, load_template

ROUTER_DESCRIPTIONS = {
    "query_norm": "`query_norm`: parameter-free; routed heads are scored by the L2 norm of their query (the "
    "continue-tuning router of MoH-LLaMA3); 0/1 gates with a straight-through gradient",
    "learned": "`learned`: two-stage router (softmax gates over the shared and over the top-k routed heads, mixed "
    "by a learned 2-way softmax) trained with a load-balance loss",
}


def _num_heads(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_attention_heads)


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
    base = config.base_model_name_or_path or "the base model"
    is_hub_id = base != "the base model" and not os.path.isabs(base) and not os.path.exists(base)
    num_heads = _num_heads(peft_model.get_base_model().config)
    shared, top_k = config.head_split(num_heads)
    lora = config.lora_config
    data = "the embedded corpus (`hf_kan/data/moh_corpus.txt`)" if args.dataset is None else f"`{args.dataset}`"
    if args.dataset is not None and args.data_files:
        data += f" (files `{args.data_files}`)"
    training = (
        f"Continue-tuned with `hf-kan moh-tune` on {data} for {metrics['steps']} optimizer steps "
        f"({metrics['num_processes']} process(es); AdamW, learning rate {args.learning_rate}, {args.batch_size} "
        f"blocks of {args.seq_len} tokens per process and step), loss = LM loss + `moh_aux_loss`. The adapter with "
        f"the lowest validation loss (step {metrics['best_step']}) was kept; the test split was evaluated once, on it."
    )
    fields = {
        "title": repo_id.rsplit("/", 1)[-1] if repo_id else f"MoH adapter for {os.path.basename(base)}",
        "base_model": base,
        "base_model_link": f"https://huggingface.co/{base}" if is_hub_id else "#usage",
        "router_description": ROUTER_DESCRIPTIONS.get(config.router, f"`{config.router}`"),
        "num_heads": num_heads,
        "num_shared": shared,
        "top_k": top_k,
        "num_routed": num_heads - shared,
        "active_heads": shared + top_k,
        "active_percent": f"{(shared + top_k) / num_heads:.0%}",
        "num_wrapped": sum(isinstance(m, MoHLayer) for m in peft_model.modules()),
        "target_modules": ", ".join(sorted(config.target_modules or [])) or "o_proj",
        "query_module": config.query_module,
        "lora_description": f"rank {lora['r']}, alpha {lora['lora_alpha']}, on "
        f"{', '.join(f'`{m}`' for m in sorted(lora['target_modules']))}"
        if lora
        else "none (MoH parameters only)",
        "load_balance_weight": config.load_balance_weight,
        "repo_id": repo_id or args.output_dir,
        "training": training,
        "metrics_table": _metrics_table(metrics),
        "hf_kan_version": __version__,
        "license": DEFAULT_LICENSE,
    }
    front = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["hf-kan", "moh", "mixture-of-head", "peft"] + (["lora"] if lora else []),
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


__all__ = ["render_adapter_card", "write_adapter_card"]
