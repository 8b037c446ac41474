r"""``GroupRational``: the Group-Rational KAN (GR-KAN) activation of KAT (Yang & Wang, arXiv 2409.10594).

Channels (last dimension) are split into G contiguous groups; every channel of group g applies

.. math::

    F_g(x) = \frac{a_{g,0} + a_{g,1} x + \dots + a_{g,5} x^5}{1 + |b_{g,1}|\,|x| + \dots + |b_{g,4}|\,|x|^4}

(the per-term safe form, ``Q >= 1``). The numerator is either shared by all groups (shape ``[1, 6]``,
the layout of the released KAT checkpoints and the default) or per group (``[G, 6]``); the
denominator is per group (``[G, 4]``). The computation is delegated to
:func:`hf_kan.ops.rational.group_rational`, which picks a backend (pure PyTorch reference, or a
fused kernel) and is tested against the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import HFKanConfigError, InputLayoutError
from ..ops.rational import DENOMINATOR_TERMS, NUMERATOR_TERMS, group_rational
from .rational_presets import RationalPreset, get_rational_preset


class GroupRational(nn.Module):
    """Learnable group-wise rational activation on inputs of shape ``[..., num_channels]``.

    Args:
        num_channels: size of the last input dimension.
        num_groups: number of contiguous channel groups G (must divide ``num_channels``).
        init: name of the preset the coefficients start from (``"identity"``, ``"swish"``, ``"gelu"``, ...;
            see :mod:`hf_kan.modules.rational_presets`).
        shared_numerator: one numerator for all groups (``[1, 6]``, checkpoint layout) if True,
            else one per group (``[G, 6]``).
        backend: backend passed to :func:`hf_kan.ops.rational.group_rational` (``"auto"`` picks
            the fastest available one; ``None`` reads ``HF_KAN_RATIONAL_BACKEND``).
        device / dtype: where and in which dtype the coefficients are created. ``dtype=None`` means float32,
            not the default dtype: the coefficients span ~4 orders of magnitude and every backend computes in
            fp32 whatever the input dtype, so a model built under a half-precision default dtype
            (``from_config(..., dtype=torch.bfloat16)``) keeps them fp32, as ``from_pretrained`` does through
            the models' ``_keep_in_fp32_modules_strict``.

    Parameters ``weight_numerator`` / ``weight_denominator`` carry the same names as in the
    authors' timm checkpoints.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 8,
        init: str = "identity",
        shared_numerator: bool = True,
        backend: str | None = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise HFKanConfigError(
                f"GroupRational: num_groups={num_groups} must be >= 1 and divide num_channels={num_channels}"
            )
        self.preset: RationalPreset = get_rational_preset(init)
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.init = init
        self.shared_numerator = shared_numerator
        self.backend = backend
        factory = {"device": device, "dtype": torch.float32 if dtype is None else dtype}
        num_rows = 1 if shared_numerator else num_groups
        self.weight_numerator = nn.Parameter(torch.empty(num_rows, NUMERATOR_TERMS, **factory))
        self.weight_denominator = nn.Parameter(torch.empty(num_groups, DENOMINATOR_TERMS, **factory))
        self.reset_parameters()

    def preset_coefficients(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The preset's coefficients expanded to this module's shapes: ``([1 or G, 6], [G, 4])``.

        Defaults to the parameters' device and dtype (CPU when the parameters are on the meta device).
        """
        dtype = dtype or self.weight_numerator.dtype
        device = torch.device(device) if device is not None else self.weight_numerator.device
        if device.type == "meta":
            device = torch.device("cpu")
        num = torch.tensor(self.preset.numerator, dtype=dtype, device=device)
        den = torch.tensor(self.preset.denominator, dtype=dtype, device=device)
        return (
            num.expand(self.weight_numerator.shape[0], -1).clone(),
            den.expand(self.num_groups, -1).clone(),
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the coefficients to the preset named by ``init`` (every group starts identical)."""
        num, den = self.preset_coefficients()
        if self.weight_numerator.device.type != "meta":
            self.weight_numerator.copy_(num)
            self.weight_denominator.copy_(den)

    @property
    def gain(self) -> float:
        """Variance-preserving gain of the initial preset (see :class:`RationalPreset`)."""
        return self.preset.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) per channel group for ``x`` of shape ``[..., num_channels]``; same shape and dtype as ``x``."""
        if x.shape[-1] != self.num_channels:
            raise InputLayoutError(
                f"GroupRational expects {self.num_channels} channels last, got input {tuple(x.shape)}"
            )
        return group_rational(x, self.weight_numerator, self.weight_denominator, backend=self.backend)

    def extra_repr(self) -> str:
        sharing = "shared" if self.shared_numerator else "per-group"
        return (
            f"{self.num_channels}, groups={self.num_groups}, init={self.init!r}, numerator={sharing}, "
            f"backend={self.backend!r}"
        )


__all__ = ["GroupRational"]
