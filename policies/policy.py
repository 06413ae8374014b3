"""A SegmentationPolicy over any Sa2VA-shaped model: LoRA + trainable heads, frozen-feature caching,
trainable-only state dicts and the adapter-disabled reference policy."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from policies.lora import LoRASpec, apply_lora, parameter_counts, part_of, set_trainable_parts

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the policy's trainable tensors."""


def bf16_autocast(device: torch.device, *, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``enabled`` (``learner.amp``), a no-op elsewhere. The rollout actors and the
    learner compute the policy under the same context, so that their log-probabilities compare like with like;
    callers take ``.float()`` of the logits, so log-probs and losses stay in float32."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def language_model(model: nn.Module) -> nn.Module:
    """The transformers LLM inside a Sa2VA-shaped model: the outermost module named ``language_model`` (tiny:
    ``language_model``; Sa2VA InternVL: ``model.language_model``; Qwen-VL: ``model.model.language_model``)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "language_model":
            return module
    raise ValueError(f"{type(model).__name__} has no language_model module")


class AdapterPolicy:
    """Wraps a model that exposes ``encode(images) -> features`` and
    ``forward(images, prompts, features=None) -> logits [B,H,W]`` (TinySa2VA, the Sa2VA adapter).

    The model is modified in place by PEFT; ``self.model`` is the PeftModel.
    """

    def __init__(self, model: nn.Module, spec: LoRASpec) -> None:
        self.spec = spec
        self.base = model
        self.model = apply_lora(model, spec)
        self._trainable_names = [n for n, _ in self.model.named_parameters() if part_of(n) in spec.trainable]
        trainable, total = parameter_counts(self.model)
        log.info(
            "policy parameters: trainable %s / total %s (%.2f%%), parts %s",
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / max(total, 1),
            ",".join(spec.trainable),
        )

    # -------------------------------------------------------------------------------- forward passes
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> AdapterPolicy:
        self.model.to(device)
        return self

    def frozen_features(self, images: Any) -> Any:
        with torch.no_grad():
            return self.base.encode(images)

    def mask_logits(
        self, images: Any, prompts: Sequence[str], *, features: Any | None = None
    ) -> torch.Tensor:
        return self.model(images, list(prompts), features=features)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each LLM decoder layer in the backward pass instead of keeping its activations
        (``learner.activation_checkpointing``; the gradients are unchanged). transformers checkpoints only in
        training mode, so the LLM is put in it; attention or LoRA dropout is refused, as training mode would turn
        it on, and so is InternLM2, whose remote code checkpoints with torch's reentrant default:
        LoRA weights inside a layer whose inputs need no gradient would get none."""
        from policies.compat import activation_checkpointing

        if self.spec.backbone == "internlm2":
            raise ValueError(
                "activation checkpointing of an InternLM2 language model is not supported (its remote code "
                "checkpoints reentrantly, which drops LoRA gradients); set learner.activation_checkpointing=false"
            )
        lm = language_model(self.base)
        dropout = float(getattr(getattr(lm, "config", None), "attention_dropout", 0.0) or 0.0)
        if dropout or self.spec.dropout:
            raise ValueError(
                f"the language model has attention dropout {dropout} and LoRA dropout {self.spec.dropout}, which "
                "training mode (needed for activation checkpointing) would switch on; set "
                "learner.activation_checkpointing=false or policy.lora_dropout=0"
            )
        try:
            activation_checkpointing(lm)
        except (ValueError, AttributeError) as exc:
            raise ValueError(
                f"{type(lm).__name__} does not support activation checkpointing ({exc}); set "
                "learner.activation_checkpointing=false"
            ) from exc
        lm.train()

    @contextmanager
    def reference(self) -> Iterator[None]:
        """LoRA off and the heads' original weights on: the policy the run started from."""
        # PEFT re-enables requires_grad on every adapter when the context exits; keep the caller's choice.
        trainable = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(trainable[n])

    # -------------------------------------------------------------------------------- trainable tensors
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        params = dict(self.model.named_parameters())
        return ((n, params[n]) for n in self._trainable_names)

    def set_trainable_parts(self, parts: Sequence[str]) -> None:
        """Narrow what the optimiser updates (e.g. heads only); the synced state dict keeps every part."""
        unknown = set(parts) - set(self.spec.trainable)
        if unknown:
            raise ValueError(
                f"parts {sorted(unknown)} are not trainable in this policy ({self.spec.trainable})"
            )
        set_trainable_parts(self.model, parts)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_trainable_parameters()}

    def load_trainable_state_dict(
        self, state_dict: dict[str, torch.Tensor], strict: bool = True, *, max_missing_fraction: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Copy tensors in place. With ``strict``, more than ``max_missing_fraction`` of the trainable tensors
        missing, any unexpected key, or any shape mismatch raises :class:`CheckpointMismatchError`."""
        own = dict(self.named_trainable_parameters())
        missing = [n for n in own if n not in state_dict]
        unexpected = [n for n in state_dict if n not in own]
        shape_bad = [
            f"{n}: checkpoint {tuple(state_dict[n].shape)} vs policy {tuple(own[n].shape)}"
            for n in own
            if n in state_dict and tuple(state_dict[n].shape) != tuple(own[n].shape)
        ]
        too_many_missing = len(missing) > max_missing_fraction * len(own)
        if shape_bad or (strict and (too_many_missing or unexpected)):
            parts = [f"{len(own) - len(missing)} of {len(own)} trainable tensors found"]
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if shape_bad:
                parts.append(f"{len(shape_bad)} with other shapes (e.g. {shape_bad[0]})")
            raise CheckpointMismatchError(
                "checkpoint does not match the policy: "
                + "; ".join(parts)
                + ". Was it saved from another backbone, LoRA rank or set of trainable parts?"
            )
        with torch.no_grad():
            for n, p in own.items():
                if n in state_dict:
                    p.copy_(state_dict[n].to(device=p.device, dtype=p.dtype))
        return missing, unexpected

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.named_trainable_parameters())

    def model_bytes(self) -> int:
        return sum(
            p.numel() * p.element_size()
            for n, p in self.model.named_parameters()
            if ".modules_to_save." not in n
        )

    def save_adapter(self, path: str) -> None:
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(path)

    def load_adapter(self, path: str) -> None:
        """Load a PEFT adapter folder written by :meth:`save_adapter` (safetensors, no pickles)."""
        from policies.compat import cpu_torchvision

        cpu_torchvision()  # before PEFT imports transformers
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(self.model, load_peft_weights(path, device=str(self.device)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointMismatchError(
                f"adapter {path} has {len(unexpected)} tensors this policy does not have (e.g. {unexpected[0]})"
            )
