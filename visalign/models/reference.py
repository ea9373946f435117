"""The DPO reference of a backbone: LoRA adapters switched off (no second copy of the model), or a frozen copy
for full fine-tuning; with a text-encoder LoRA, the reference's own adapters-off text conditioning too."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .cond import Cond
from .lora import add_twin_adapter, set_adapters_enabled, using_adapter


class ReferenceMixin:
    """``reference()``: inside it ``predict`` runs the reference model."""

    denoiser: torch.nn.Module
    _reference_denoiser: torch.nn.Module | None = None
    _reference_active: bool = False
    uses_lora: bool = False

    def freeze_reference_copy(self, dtype: torch.dtype | None = None) -> None:
        """Full fine-tuning: keep a frozen deep copy of the current denoiser as the reference."""
        ref = copy.deepcopy(self.unwrapped()).eval().requires_grad_(False)
        self._reference_denoiser = ref.to(dtype) if dtype is not None else ref

    def reference_weights(self) -> dict[str, Tensor] | None:
        """The frozen reference copy's trainable-part weights (the LoRA, or everything), for a checkpoint of a
        run whose reference moved (Curry-DPO stages); None when the reference is 'adapters off'."""
        if self._reference_denoiser is None:
            return None
        trainable = {n for n, p in self.unwrapped().named_parameters() if p.requires_grad}
        return {n: p.detach().cpu().contiguous() for n, p in self._reference_denoiser.named_parameters()
                if n in trainable}

    def restore_reference(self, weights: dict[str, Tensor]) -> None:
        """A frozen reference copy of the policy with ``weights`` (from ``reference_weights``) put back."""
        self.freeze_reference_copy()
        params = dict(self._reference_denoiser.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this context ``predict`` runs the reference model (no grad is implied; callers choose)."""
        if self._reference_active:
            yield
            return
        self._reference_active = True
        base = self.unwrapped()
        try:
            if self._reference_denoiser is None and self.uses_lora:
                set_adapters_enabled(base, False)
            for encoder in self.text_encoders_for_lora().values() if self.text_lora else ():
                set_adapters_enabled(encoder, False)
            yield
        finally:
            if self._reference_denoiser is None and self.uses_lora:
                set_adapters_enabled(base, True)
            for encoder in self.text_encoders_for_lora().values() if self.text_lora else ():
                set_adapters_enabled(encoder, True)
            self._reference_active = False

    def add_twin_adapter(self, name: str) -> list[torch.nn.Parameter]:
        """A second LoRA module beside the policy's, identical at the start; returns its parameters."""
        return add_twin_adapter(self, name)

    def adapter(self, name: str) -> contextlib.AbstractContextManager:
        """Inside this context ``predict`` runs LoRA module ``name`` (``add_twin_adapter``) instead of the policy's."""
        return using_adapter(self, name)

    text_lora: bool = False  # a LoRA on the text encoder(s) too (lora.text_encoder)

    def text_encoders_for_lora(self) -> dict[str, torch.nn.Module]:
        """The CLIP text encoders a text-encoder LoRA adapts, by the names diffusers' LoRA files give them."""
        return {n: m for n in ("text_encoder", "text_encoder_2")
                if isinstance(m := getattr(self, n, None), torch.nn.Module)}

    def encode_for_training(self, prompts: Sequence[str], image_meta: dict | None = None) -> Cond:
        """The conditioning a loss uses: without grad, unless the text encoders carry a LoRA; then with grad,
        plus the reference's own (adapters off) under ``ref.*`` keys, which ``predict`` uses under
        ``reference()``."""
        if not self.text_lora:
            with torch.no_grad():
                return self.encode_prompts(prompts, image_meta)
        cond = self.encode_prompts(prompts, image_meta)
        with torch.no_grad(), self.reference():
            ref = self.encode_prompts(prompts, image_meta)
        return Cond(cond.tensors | {f"ref.{k}": v for k, v in ref.tensors.items()})

    def active_denoiser(self) -> torch.nn.Module:
        if self._reference_active and self._reference_denoiser is not None:
            return self._reference_denoiser
        return self.denoiser

    def _inputs_for(self, model: torch.nn.Module, x_t: Tensor, cond: Cond) -> tuple[Tensor, Cond]:
        """The reference reads its own text conditioning (``ref.*``, with a text-encoder LoRA) and, kept in
        lower precision, gets its inputs in its own dtype."""
        if any(k.startswith("ref.") for k in cond.tensors):
            own = {k: v for k, v in cond.tensors.items() if not k.startswith("ref.")}
            ref = {k[4:]: v for k, v in cond.tensors.items() if k.startswith("ref.")}
            cond = Cond(own | ref) if self._reference_active else Cond(own)
        if model is self._reference_denoiser and model is not None:
            dtype = next(model.parameters()).dtype
            if x_t.dtype != dtype:
                return x_t.to(dtype), cond.map(lambda v: v.to(dtype) if v.is_floating_point() else v)
        return x_t, cond
