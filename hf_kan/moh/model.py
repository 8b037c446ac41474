"""The MoH tuner model: finds the attention output projections, wraps them in ``MoHLinear`` and gathers losses."""

from __future__ import annotations

from typing import Any

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import UnsupportedModelError
from .config import MoHConfig
from .layer import MoHLayer, MoHLinear, raise_not_mergeable
from .peft_type import MOH_PREFIX
from .skip import install_head_skipping, remove_head_skipping

# Output projection of the decoder self-attention, keyed by the top-level ``config.model_type``. Vision towers use
# other names (CLIP: out_proj, Qwen2-VL ViT: proj), so "o_proj" selects the language model only.
TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    name: ["o_proj"]
    for name in (
        "llama",
        "mistral",
        "qwen2",
        "qwen2_vl",
        "qwen2_vl_text",
        "qwen2_5_vl",
        "qwen2_5_vl_text",
        "llava",
        "llava_next",
    )
}


def _attention_geometry(attention: nn.Module, out_proj_in_features: int) -> tuple[int, int, int]:
    """(num_heads, head_dim, hidden_size) of an attention block, read from the module and its config."""
    config = getattr(attention, "config", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None and config is not None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    hidden_size = getattr(config, "hidden_size", None)
    if not head_dim or out_proj_in_features % head_dim or hidden_size is None:
        raise UnsupportedModelError(
            f"MoH cannot read the head layout of {type(attention).__name__} (needs `head_dim` and a config with "
            "`hidden_size`); target the output projection of a Transformers self-attention block."
        )
    return out_proj_in_features // head_dim, head_dim, hidden_size


class MoHModel(BaseTuner):
    """Mixture-of-Head attention (arXiv 2410.11842) as a PEFT tuner.

    Example::

        import hf_kan  # registers PeftType.MOH
        from peft import get_peft_model
        from hf_kan.moh import MoHConfig, moh_aux_loss

        model = get_peft_model(base, MoHConfig(router="learned", active_fraction=0.75))
        out = model(input_ids, labels=input_ids)
        loss = out.loss + moh_aux_loss(model)
    """

    prefix: str = MOH_PREFIX
    tuner_layer_cls = MoHLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: MoHConfig, model_config: dict) -> MoHConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise UnsupportedModelError(
                    f"MoH has no default target modules for model_type={model_type!r}; pass "
                    "MoHConfig(target_modules=[<attention output projection name>]) (e.g. 'o_proj')."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: MoHConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        query_module = getattr(parent, peft_config.query_module, None)
        if query_module is None:
            raise UnsupportedModelError(
                f"MoH target {current_key!r} has no sibling {peft_config.query_module!r} in {type(parent).__name__}; "
                "set MoHConfig.query_module to the name of the query projection of that attention block."
            )
        if isinstance(target, MoHLayer):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        in_features = getattr(base, "in_features", None)
        if in_features is None:
            raise UnsupportedModelError(
                f"MoH target {current_key!r} is a {type(base).__name__}; it must be the linear output projection of "
                "an attention block (input = concatenated heads)."
            )
        num_heads, head_dim, hidden_size = _attention_geometry(parent, in_features)
        new_module = MoHLinear(target, adapter_name, peft_config, num_heads, head_dim, hidden_size)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        new_module.attach_query_hook(query_module)
        install_head_skipping(parent, new_module)

    def _pre_injection_hook(self, model: nn.Module, config: MoHConfig, adapter_name: str) -> None:
        # LoRA + MoH in one adapter: LoRA layers are injected first (same adapter name) and MoH then wraps the output
        # projections, LoRA-wrapped or not. PEFT finds adapter weights structurally (every tuner layer), so this
        # adapter's save_pretrained / from_pretrained carry the LoRA weights too, and disable_adapter() turns LoRA off
        # as well. (mixed=True PEFT models reject third-party tuners, so this is the supported way to combine them.)
        lora_config = config.make_lora_config()
        if lora_config is not None:
            inject_adapter_in_model(lora_config, model, adapter_name=adapter_name)

    def _post_injection_hook(self, model: nn.Module, config: MoHConfig, adapter_name: str) -> None:
        # Every forward of the wrapped model starts by forgetting the previous forward's load-balance losses, so
        # moh_aux_loss() always reports the current forward (PeftModel may call the wrapped model directly).
        if getattr(self, "_moh_reset_hook", None) is None:
            self._moh_reset_hook = model.register_forward_pre_hook(self._reset_aux_losses)

    def _reset_aux_losses(self, module: nn.Module, args: tuple) -> None:
        for layer in self._moh_layers():
            layer._moh_aux.clear()

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        if merge:
            raise_not_mergeable()
        if getattr(self, "_moh_reset_hook", None) is not None:
            self._moh_reset_hook.remove()
            self._moh_reset_hook = None
        remove_head_skipping(self.model)
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        # A LoRA layer that MoH wrapped is exposed only after MoH is gone: unload it in a second pass.
        injected_lora = any(getattr(c, "lora_config", None) for c in self.peft_config.values())
        if injected_lora and any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        return model

    def _moh_layers(self) -> list[MoHLayer]:
        return [m for m in self.model.modules() if isinstance(m, MoHLayer)]

    def moh_aux_loss(self) -> torch.Tensor:
        """Weighted load-balance loss of the last training forward (see :func:`moh_aux_loss`)."""
        return moh_aux_loss(self.model)


def moh_aux_loss(model: nn.Module) -> torch.Tensor:
    """The load-balance loss to add to the task loss, from the MoH layers' last training forward:

        sum over adapters a of load_balance_weight_a * mean over the MoH layers l of L_b(a, l),

    with L_b = E * sum_i f_i P_i per layer. Averaging over layers follows the authors (ViT, DiT and LLaMA code all
    take the mean), so the default weight 0.01 is the effective weight at any depth. ``model``: a PeftModel, the tuner
    or any module containing MoH layers. Zero (a tensor) when the router has no loss or nothing was recorded."""
    peft_config = getattr(model, "peft_config", None) or {}
    per_adapter: dict[str, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, MoHLayer):
            for name, aux in module._moh_aux.items():
                per_adapter.setdefault(name, []).append(aux)
    total = None
    for name, losses in per_adapter.items():
        config = peft_config.get(name)
        weight = config.load_balance_weight if config is not None else MoHConfig.load_balance_weight
        term = weight * torch.stack(losses).mean()
        total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


__all__ = ["TRANSFORMERS_MODELS_TO_MOH_TARGET_MODULES_MAPPING", "MoHModel", "moh_aux_loss"]
