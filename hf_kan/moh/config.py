"""Configuration of the Mixture-of-Head (MoH) PEFT method (Jin et al., arXiv 2410.11842)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.config import PeftConfig

from ..errors import HFKanConfigError
from .registration import moh_peft_type

ROUTERS = ("query_norm", "learned")


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
        num_shared_heads: heads that every token uses (the first ones). Default: half of the heads.
        active_fraction: fraction of all heads active per token; sets top_k = round(active_fraction * H) -
            num_shared_heads. Default 0.75 as in MoH-LLaMA3-8B.
        top_k: routed heads per token; overrides ``active_fraction`` when given.
        target_modules: the attention output projections to wrap (their input is the concatenation of head outputs,
            [..., H * D]). Default: ``o_proj`` for the known model types.
        query_module: name of the sibling module (in the same attention block) whose output is the per-head
            queries [..., H * D] and whose input is the token representation x. Default ``q_proj``.
        load_balance_weight: weight of the load-balance loss returned by ``moh_aux_loss`` (learned router).
        router_init_std: std of the normal init of the learned router weights; 0 gives exactly uniform router
            probabilities, so all shared and selected routed gates start at exactly 1 (plain multi-head attention
            on the selected heads).
        lora_config: optional ``LoraConfig`` (or its keyword dict) to inject LoRA first and wrap MoH around it, in
            the same adapter: ``save_pretrained`` then writes LoRA and router weights together and
            ``PeftModel.from_pretrained`` rebuilds both. Stored as a JSON-ready dict.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in other PEFT methods.
    """

    router: Literal["query_norm", "learned"] = field(default="query_norm", metadata={"help": "Router kind."})
    num_shared_heads: int | None = field(default=None, metadata={"help": "Always-on heads; default H // 2."})
    active_fraction: float = field(default=0.75, metadata={"help": "Fraction of heads active per token."})
    top_k: int | None = field(default=None, metadata={"help": "Routed heads per token; overrides active_fraction."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Output projections to wrap."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave alone."})
    query_module: str = field(default="q_proj", metadata={"help": "Sibling module producing the queries."})
    load_balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss."})
    router_init_std: float = field(default=0.0, metadata={"help": "Std of the learned router's normal init."})
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
        if self.router_init_std < 0:
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
        """Return (num_shared, top_k) for an attention block with ``num_heads`` heads, validated."""
        shared = num_heads // 2 if self.num_shared_heads is None else self.num_shared_heads
        if shared > num_heads:
            raise HFKanConfigError(
                f"MoHConfig.num_shared_heads={shared} exceeds the {num_heads} heads of the attention block."
            )
        routed = num_heads - shared
        top_k = self.top_k if self.top_k is not None else round(self.active_fraction * num_heads) - shared
        if not 0 <= top_k <= routed:
            raise HFKanConfigError(
                f"MoH selects top_k={top_k} of {routed} routed heads ({num_heads} heads, {shared} shared); "
                "choose top_k / active_fraction / num_shared_heads so that 0 <= top_k <= routed heads."
            )
        return shared, top_k


__all__ = ["MoHConfig"]
