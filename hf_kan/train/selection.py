"""Model selection on the validation split, with optional early stopping, for every hf-kan trainer.

:class:`ModelSelector` sees each validation result, keeps a CPU copy of the parameters of the best one, counts the
evaluations since the last improvement (early stopping) and, after training, puts the best parameters back into the
model, which is then the one evaluated on the test split and saved. Keeping the copy in memory (instead of
re-reading a checkpoint) costs one copy of the selected parameters on the CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..errors import HFKanConfigError


class ModelSelector:
    """Track the best value of ``metric`` (``mode="max"`` or ``"min"``) over validation evaluations.

    ``patience``: stop after this many evaluations in a row without improvement (``None``: never).
    ``trainable_only``: copy only parameters with ``requires_grad`` (e.g. a PEFT adapter on a frozen model).
    """

    def __init__(
        self,
        metric: str,
        mode: Literal["max", "min"] = "max",
        patience: int | None = None,
        trainable_only: bool = False,
    ):
        if mode not in ("max", "min"):
            raise HFKanConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience is not None and patience < 1:
            raise HFKanConfigError(f"early-stopping patience must be >= 1 evaluation, got {patience}")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.trainable_only = trainable_only
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, Any] = {}
        self.evaluations_since_best = 0
        self._state: dict[str, torch.Tensor] | None = None

    def _improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def update(self, model: torch.nn.Module, metrics: dict[str, Any], step: int) -> bool:
        """Record one validation result of ``model`` at optimizer step ``step``; returns whether it is the new best
        (then the model's parameters are copied)."""
        if self.metric not in metrics:
            raise HFKanConfigError(f"validation metrics {sorted(metrics)} lack the selection metric {self.metric!r}")
        value = float(metrics[self.metric])
        if not self._improves(value):
            self.evaluations_since_best += 1
            return False
        self.best_value, self.best_step, self.best_metrics = value, step, dict(metrics)
        self.evaluations_since_best = 0
        if self.trainable_only:
            items = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
        else:
            items = model.state_dict().items()
        self._state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in items}
        return True

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and self.evaluations_since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best parameters recorded by :meth:`update` into ``model`` (in place)."""
        if self._state is None:
            raise HFKanConfigError("no validation result was recorded; evaluate at least once before restoring")
        with torch.no_grad():
            if self.trainable_only:
                params = dict(model.named_parameters())
                for name, value in self._state.items():
                    params[name].copy_(value)
            else:
                model.load_state_dict(self._state)

    def summary(self) -> dict[str, Any]:
        """What was selected, for metrics.json: metric, mode, best value and step, patience."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "patience": self.patience,
        }


__all__ = ["ModelSelector"]
