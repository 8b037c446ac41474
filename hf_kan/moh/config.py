"""Configuration of the Mixture-of-Head (MoH) PEFT method (Jin et al., arXiv 2410.11842)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.config import PeftConfig

from ..errors import HFKanConfigError
from .peft_type import moh_peft_type

ROUTERS = ("query_norm", "learned")

# Default init of the learned router's routed-head scores W_r: std = ROUTER_INIT_SCALE / sqrt(hidden_size), i.e.
# routing logits of std ~0.01 for unit-RMS inputs (see MoHConfig.router_init_std).
ROUTER_INIT_SCALE = 1e-2
# Absorbs float error in active_fraction * H before flooring (0.7 * 10 - 5 = 1.9999999999999996).
_SPLIT_EPS = 1e-9


# PeftConfig bookkeeping that belongs to the outer (MoH) adapter, not to the LoRA settings stored inside it.
_LORA_DROPPED_KEYS = (
    "peft_type",
    "task_type",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
    "inference_mode",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _lora_kwargs(lora: LoraConfig | dict[str, Any]) -> dict[str, Any]:
    """LoRA settings as a JSON-ready keyword dict, validated by building a ``LoraConfig`` from it."""
    if isinstance(lora, LoraConfig):
        lora = lora.to_dict()
    if not isinstance(lora, dict):
        raise HFKanConfigError(f"MoHConfig.lora_config must be a peft.LoraConfig or a dict, got {type(lora).__name__}.")
    kwargs = {k: _jsonable(v) for k, v in lora.items() if k not in _LORA_DROPPED_KEYS}
    try:
        LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise HFKanConfigError(f"MoHConfig.lora_config is not a valid LoraConfig: {err}") from err
    return kwargs


@dataclass
class MoHConfig(PeftConfig):
    """Turns the multi-head attention of a Transformers model into Mixture-of-Head attention.

    MoH(x) = sum_i g_i(x) H_i W_O^i: each head's output H_i is scaled by a per-token gate g_i before the output
    projection; g_i = 0 for the heads a token does not select. The first ``num_shared_heads`` heads are always on;
    ``top_k`` of the remaining (routed) heads are selected per token.

    Args:
        router: ``"query_norm"`` (default): the parameter-free continue-tuning router of MoH-LLaMA3; routed heads are
            scored by the L2 norm of their query vector, gates are binary (0/1) with a straight-through estimator, and
            the adapter has no parameters of its own (train it together with LoRA or full fine-tuning).
            ``"learned"``: the two-stage router g_shared = alpha1 * softmax(W_s x), g_routed = alpha2 * softmax(W_r x)
            on the top-k, [alpha1, alpha2] = softmax(W_h x), rescaled so every gate starts near 1, with the
            load-balance loss L_b = E * sum_i f_i P_i.
        num_shared_heads: heads that every token uses (the first ones). Default int(H / 2), as in the authors' code.
        active_fraction: fraction of all heads active per token (default 0.75 as in MoH-LLaMA3-8B). The default split
            follows the authors: int(H / 2) shared heads and top_k = int((active_fraction - 1/2) * H) routed heads,
            i.e. int(0.5 H) + int(0.25 H) at 0.75 (H = 10: 5 + 2, H = 7: 3 + 1). With ``num_shared_heads=s`` given,
            top_k = int(active_fraction * H) - s. ``active_fraction=1.0`` activates every head.
        top_k: routed heads per token; overrides ``active_fraction`` when given.
        target_modules: the attention output projections to wrap (their input is the concatenation of head outputs,
            [..., H * D]). Default: ``o_proj`` for the known model types.
        query_module: name of the sibling module (in the same attention block) whose output is the per-head
            queries [..., H * D] and whose input is the token representation x. Default ``q_proj``.
        load_balance_weight: weight of the load-balance loss: ``moh_aux_loss`` returns load_balance_weight times
            the MEAN of L_b over the MoH layers (the authors average over layers), so 0.01 is the effective weight
            whatever the depth (learned router only).
        router_init_std: std of the normal init of the learned router's routed-head scores W_r. Default (None):
            1e-2 / sqrt(hidden_size), routing logits of std ~0.01 for unit-RMS inputs. Top-k selection does not depend
            on the scale of W_r, so every token already picks its own routed heads at step 0 (the authors also start
            from random weights: xavier in DiT, std 0.02 in ViT), while the routed gates k * p_i / sum_top-k p start
            within ~1 % of 1. W_s and W_h start at zero, so the shared gates and alpha1, alpha2 start at exactly 1:
            the adapted model starts as the pretrained one restricted to the selected heads, as far as the design
            allows. 0 gives the exactly uniform router (every gate exactly 1, but every token then selects the same
            routed heads, by tie-breaking, until training separates them); 0.02 follows the authors' ViT recipe.
        skip_inactive_heads: at inference on CPU, compute attention only for the (token, head) pairs the router keeps
            (decode: per sample, the key/value heads whose query heads are all inactive are not read; prefill: query
            blocks in which a head is inactive for every query are skipped when that saves enough work). The result
            equals the dense gated computation. Only for the ``sdpa`` and ``hf_kan`` attention implementations; other
            implementations, training (gates that need gradients), other devices and any attention call the fast
            path cannot reproduce use the dense gated path. See ``hf_kan.moh.skip``.
        lora_config: optional ``LoraConfig`` (or its keyword dict) to inject LoRA first and wrap MoH around it, in
            the same adapter: ``save_pretrained`` then writes LoRA and router weights together and
            ``PeftModel.from_pretrained`` rebuilds both. Stored as a JSON-ready dict.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in other PEFT methods.
    """

    router: Literal["query_norm", "learned"] = field(default="query_norm", metadata={"help": "Router kind."})
    num_shared_heads: int | None = field(default=None, metadata={"help": "Always-on heads; default int(H / 2)."})
    active_fraction: float = field(default=0.75, metadata={"help": "Fraction of heads active per token."})
    top_k: int | None = field(default=None, metadata={"help": "Routed heads per token; overrides active_fraction."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Output projections to wrap."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave alone."})
    query_module: str = field(default="q_proj", metadata={"help": "Sibling module producing the queries."})
    load_balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss."})
    router_init_std: float | None = field(
        default=None, metadata={"help": "Std of the learned router's W_r init; default 1e-2 / sqrt(hidden)."}
    )
    skip_inactive_heads: bool = field(
        default=True, metadata={"help": "Skip the attention work of inactive heads at inference (CPU)."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained and saved."})
    lora_config: dict[str, Any] | None = field(default=None, metadata={"help": "LoRA injected under MoH."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = moh_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.router not in ROUTERS:
            raise HFKanConfigError(f"MoHConfig.router must be one of {ROUTERS}, got {self.router!r}.")
        if not 0.0 < self.active_fraction <= 1.0:
            raise HFKanConfigError(f"MoHConfig.active_fraction must lie in (0, 1], got {self.active_fraction}.")
        if self.num_shared_heads is not None and self.num_shared_heads < 0:
            raise HFKanConfigError(f"MoHConfig.num_shared_heads must be >= 0, got {self.num_shared_heads}.")
        if self.top_k is not None and self.top_k < 0:
            raise HFKanConfigError(f"MoHConfig.top_k must be >= 0, got {self.top_k}.")
        if self.load_balance_weight < 0:
            raise HFKanConfigError(f"MoHConfig.load_balance_weight must be >= 0, got {self.load_balance_weight}.")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise HFKanConfigError(f"MoHConfig.router_init_std must be >= 0, got {self.router_init_std}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise HFKanConfigError("MoHConfig.layers_pattern needs layers_to_transform; set both or neither.")
        if self.lora_config is not None:
            self.lora_config = _lora_kwargs(self.lora_config)

    def make_lora_config(self) -> LoraConfig | None:
        """The ``LoraConfig`` to inject under MoH, or None."""
        if self.lora_config is None:
            return None
        return LoraConfig(**self.lora_config, inference_mode=self.inference_mode)

    def head_split(self, num_heads: int) -> tuple[int, int]:
        """Return (num_shared, top_k) for an attention block with ``num_heads`` heads, validated (rule: see Args)."""
        if self.num_shared_heads is None:
            shared = num_heads // 2
            routed_active = (self.active_fraction - 0.5) * num_heads
        else:
            shared = self.num_shared_heads
            routed_active = self.active_fraction * num_heads - shared
        if shared > num_heads:
            raise HFKanConfigError(
                f"MoHConfig.num_shared_heads={shared} exceeds the {num_heads} heads of the attention block."
            )
        routed = num_heads - shared
        if self.top_k is not None:
            top_k = self.top_k
        elif self.active_fraction >= 1.0:
            top_k = routed  # every head, also for odd H where (1 - 1/2) * H rounds down
        else:
            top_k = math.floor(routed_active + _SPLIT_EPS)
        if not 0 <= top_k <= routed:
            raise HFKanConfigError(
                f"MoH selects top_k={top_k} of {routed} routed heads ({num_heads} heads, {shared} shared); "
                "choose top_k / active_fraction / num_shared_heads so that 0 <= top_k <= routed heads "
                "(with the default int(H / 2) shared heads, active_fraction must be at least 0.5)."
            )
        return shared, top_k

    def router_init_std_for(self, hidden_size: int) -> float:
        """Std of the learned router's W_r init for a model with ``hidden_size`` (default 1e-2 / sqrt(hidden))."""
        if self.router_init_std is not None:
            return self.router_init_std
        return ROUTER_INIT_SCALE / math.sqrt(hidden_size)


__all__ = ["MoHConfig"]
