"""Finding VAR's sink dimensions from a model's own first-token hidden state (the ``calibrate-var`` command is in
``cli.py``).

Massive activations (Sun et al., 2024) sit in a few fixed hidden dimensions of the base LLM and show up on the first
token of any sequence from the early layers on. The score of dimension d is

    score_d = max over layers l >= 2 (residual stream entering l) and samples of |x_d / RMS(x)| at the first real token

and the sink dimensions are the ``num_dims`` highest scores. For LLaMA-2-7B this gives 2533 and 1415, for
LLaMA-2-13B 2100 and 4743 (the values published with VAR).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers.utils import logging

from ...errors import HFKanConfigError, InputLayoutError
from ..engine.config import CONFIG_ATTRIBUTE

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def _patches_suspended(model: nn.Module):
    """Run the model as plain attention (its ``hf_kan`` section hidden) for the duration of the block."""
    text_config = model.config.get_text_config()
    saved = getattr(text_config, CONFIG_ATTRIBUTE, None)
    setattr(text_config, CONFIG_ATTRIBUTE, None)
    try:
        yield
    finally:
        setattr(text_config, CONFIG_ATTRIBUTE, saved)


def _default_inputs(model: nn.Module) -> dict:
    bos = getattr(model.config.get_text_config(), "bos_token_id", None)
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if bos is None:
        raise InputLayoutError(
            "the model config has no bos_token_id, so find_sink_dims cannot build a first-token prompt; pass "
            "inputs={'input_ids': ..., 'attention_mask': ...} with a short tokenized prompt"
        )
    return {"input_ids": torch.tensor([[int(bos)]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}


def sink_dim_scores(model: nn.Module, inputs: dict | None = None, layers: list[int] | None = None) -> torch.Tensor:
    """``(hidden,)`` float32 scores ``max_{l, sample} |x_d / RMS(x)|`` of the first real token of each sample, on the
    residual stream entering decoder layers ``layers`` (default: every layer from 2 on).

    ``inputs`` are model keyword arguments (``input_ids`` and optionally ``attention_mask``; text only is enough);
    by default a one-token prompt made of the BOS token. Patches are suspended during this forward.
    """
    inputs = dict(inputs) if inputs is not None else _default_inputs(model)
    if "input_ids" not in inputs:
        raise InputLayoutError("find_sink_dims needs inputs with 'input_ids'")
    device = next(model.parameters()).device
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    inputs.update(input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters and "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = torch.zeros_like(ids, dtype=torch.int)  # Qwen: a text-only prompt
    with _patches_suspended(model), torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    states = out.hidden_states  # states[l] enters layer l; the last entry is after the final norm
    num_layers = len(states) - 1
    if layers is None:
        layers = [i for i in range(2, num_layers)] or list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise HFKanConfigError(f"layers {bad} do not exist: the model has {num_layers} decoder layers")
    first = mask.long().argmax(-1)  # first real column of each sample (left padding skipped)
    rows = torch.arange(ids.shape[0], device=device)
    x = torch.stack([states[i][rows, first].float() for i in layers])  # (L, B, D)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return (x / rms).abs().amax(dim=(0, 1)).cpu()


def find_sink_dims(model: nn.Module, inputs: dict | None = None, num_dims: int = 2,
                   layers: list[int] | None = None) -> list[int]:
    """The ``num_dims`` hidden dimensions with the largest first-token ``|x_d / RMS(x)|`` (see ``sink_dim_scores``),
    strongest first. Logs a warning when even the strongest is below VAR's default ``tau = 20`` (then the model shows
    no massive activation at the first token and VAR will find few or no sink tokens)."""
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise HFKanConfigError(f"num_dims must be a positive int, got {num_dims!r}")
    scores = sink_dim_scores(model, inputs, layers)
    top = torch.topk(scores, min(num_dims, scores.numel()))
    dims = [int(i) for i in top.indices]
    if float(top.values[0]) < 20.0:
        logger.warning(f"the strongest first-token activation is only {float(top.values[0]):.1f} x RMS (dims {dims}); "
                       "this model may have no massive activations, so VAR (tau=20) would find few sink tokens")
    return dims


__all__ = ["find_sink_dims", "sink_dim_scores"]
