"""What the model card (``README.md``) of an MoH adapter says beyond hf-kan's generic adapter card.

The card is rendered by :func:`hf_kan.hub.render_adapter_card` from ``model_cards/moh.md`` (front matter, usage,
config table, citation from ``model_cards/citations/moh.bib``, ``model-index``); this module supplies the parts only
MoH knows: the method table (:func:`moh_method_table`: router, head split, active-head ratio) and, for an adapter
trained by ``hf-kan moh-tune``, how it was trained and its validation / test figures (:func:`trained_card_parts`).
Dependencies go one way: this module imports :mod:`hf_kan.hub`, never the reverse.
"""

from __future__ import annotations

import os
from typing import Any

from ..hub import render_adapter_card
from .layer import MoHLayer

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


def trained_card_parts(peft_model: Any, *, args: Any, metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(extra_info, fields)`` for :func:`hf_kan.hub.render_adapter_card` of the adapter of ``peft_model`` trained by
    ``hf-kan moh-tune`` (``args``: its ``MoHTuneArguments``, ``metrics``: what it returned).

    ``extra_info``: the title, the extra tags and, when there is a test split, the test loss and perplexity (they
    become ``model-index`` results). ``fields``: ``method_table``, ``training`` and ``metrics_table``.
    """
    config = peft_model.peft_config["default"]
    data = "the embedded corpus (`hf_kan/data/moh_corpus.txt`)" if args.dataset is None else f"`{args.dataset}`"
    if args.dataset is not None and args.data_files:
        data += f" (files `{args.data_files}`)"
    training = (
        f"Continue-tuned with `hf-kan moh-tune` on {data} for {metrics['steps']} optimizer steps "
        f"({metrics['num_processes']} process(es); AdamW, learning rate {args.learning_rate}, {args.batch_size} "
        f"blocks of {args.seq_len} tokens per process and step), loss = LM loss + `moh_aux_loss`. The adapter with "
        f"the lowest validation loss (step {metrics['best_step']}) was kept; the test split was evaluated once, on it."
    )
    info: dict[str, Any] = {
        "model_name": f"MoH adapter for {os.path.basename(str(config.base_model_name_or_path))}",
        "tags": ["mixture-of-head"] + (["lora"] if config.lora_config else []),
    }
    if metrics.get("test_loss") is not None:
        info.update(metrics={"test_loss": metrics["test_loss"], "test_perplexity": metrics["test_perplexity"]},
                    metrics_dataset=args.dataset or "hf_kan/data/moh_corpus.txt",
                    metrics_source="measured by hf-kan moh-tune")
    fields = {
        "method_table": moh_method_table(
            config,
            _num_heads(peft_model.get_base_model().config),
            sum(isinstance(m, MoHLayer) for m in peft_model.modules()),
        ),
        "training": training,
        "metrics_table": _metrics_table(metrics),
    }
    return info, fields


def write_adapter_card(peft_model: Any, output_dir: str, *, args: Any, metrics: dict[str, Any],
                       repo_id: str | None = None) -> str:
    """Write the hf-kan card of an adapter trained by ``hf-kan moh-tune`` to ``output_dir/README.md`` (replacing
    PEFT's blank template): :func:`hf_kan.hub.render_adapter_card` with :func:`trained_card_parts`. Returns the
    path."""
    info, fields = trained_card_parts(peft_model, args=args, metrics=metrics)
    num_parameters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    text = render_adapter_card(peft_model.peft_config["default"], num_parameters=num_parameters, repo_id=repo_id,
                               extra_info=info, fields=fields)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


__all__ = ["moh_method_table", "trained_card_parts", "write_adapter_card"]
