"""Freezing Mask2Former's backbone and pixel decoder: no gradients, and locked in eval mode through training.

Parts are found by attribute path, never by name substring: the pixel decoder has its own ``.encoder``. A frozen
part gets ``requires_grad=False`` and is locked in eval mode: its ``train`` method is replaced by one that always
sets eval mode, so no later ``model.train()`` (the Trainer calls it before every step) can switch its dropout,
drop-path or norm layers back.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

FROZEN_PARTS = {
    "backbone": "model.pixel_level_module.encoder",
    "pixel_decoder": "model.pixel_level_module.decoder",
}
DEFAULT_FROZEN_PARTS = ("backbone", "pixel_decoder")


def frozen_modules(model: nn.Module, parts: Sequence[str]) -> list[nn.Module]:
    """The modules named by ``parts`` (``backbone``, ``pixel_decoder``), found by attribute, never by substring."""
    modules = []
    for part in parts:
        if part not in FROZEN_PARTS:
            raise ValueError(f"unknown part {part!r}; choose from {sorted(FROZEN_PARTS)}")
        modules.append(model.get_submodule(FROZEN_PARTS[part]))
    return modules


def freeze(model: nn.Module, parts: Sequence[str]) -> dict[str, int]:
    """Freeze ``parts`` (no gradients, eval mode) and return trainable and frozen parameter counts."""
    for module in frozen_modules(model, parts):
        module.requires_grad_(False)
        module.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_parameters": trainable, "frozen_parameters": frozen}


class EvalModeLock:
    """Replacement for a module's ``train`` method that keeps the module (and its children) in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        """Ignore ``mode`` and set eval mode."""
        return nn.Module.train(self.module, False)


def lock_eval_mode(modules: Sequence[nn.Module]) -> None:
    """Put ``modules`` in eval mode and keep them there through any later ``train()`` of a parent."""
    for module in modules:
        module.eval()
        # An instance attribute shadows nn.Module.train; parents call child.train(mode) and so reach it.
        module.train = EvalModeLock(module)
