"""What this environment lacks for transformers and Sa2VA's remote code: three named shims.

Each one is applied only when the thing it replaces is missing or broken, and each is idempotent:

* ``cpu_torchvision``: on CPU-only machines the torchvision wheel that pip finds is a CUDA build. Its C
  extension cannot load against CPU torch, and ``import torchvision`` dies registering fake kernels for ops
  that do not exist ("operator torchvision::nms does not exist"). transformers imports torchvision when it is
  installed, even for a text model, so every module that imports transformers or PEFT calls this first.
  Sa2VA's remote code only uses ``torchvision.transforms``. After that exact failure, torchvision is
  imported without its ``_meta_registrations`` module.
* ``attn_mask_utils``: transformers 5 removed ``transformers.modeling_attn_mask_utils``, and the remote
  ``modeling_phi3.py`` (imported by every Sa2VA release, whatever its LLM) imports
  ``_prepare_4d_causal_attention_mask`` from it at import time. A stand-in module provides the name; calling
  it raises, because only Phi-3-based checkpoints would call it.
* ``post_init``: transformers 5's ``from_pretrained`` needs attributes that ``PreTrainedModel.post_init()``
  sets, and ``Sa2VAChatModel.__init__`` never calls it. The remote class is wrapped to call it when it was
  not called.
* ``composite_config``: transformers 4.57 renamed ``PretrainedConfig.is_composition`` to
  ``has_no_defaults_at_init``. ``Sa2VAChatConfig`` sets the old name, so 4.57 builds it without arguments to
  find its defaults and fails (``KeyError: 'architectures'``). The new name is set from the old one.

Two context managers serve checks against the remote inference code (``compare_with_remote`` in
policies/sa2va_remote_checks.py): ``remote_inference_on`` redirects its hard-coded CUDA device to the model's
device on CPU machines, and ``forced_generation`` forces the tokens a generation emits (a random-init model
never emits [SEG]). ``set_attention`` sets an LLM's attention implementation under either transformers API, and
``activation_checkpointing`` switches on its activation checkpointing under either name.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

REMOTE_MODEL = "modeling_sa2va_chat.Sa2VAChatModel"
REMOTE_CONFIG = "configuration_sa2va_chat.Sa2VAChatConfig"


def cpu_torchvision() -> bool:
    """Import torchvision; returns True when the CPU shim was needed. No-op if torchvision is absent."""
    if "torchvision" in sys.modules:
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except ModuleNotFoundError:
        return False
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    importlib.import_module("torchvision")
    log.info("torchvision's C ops do not load against this torch (a CUDA build on a CPU torch); using its "
             "Python transforms only")  # fmt: skip
    return True


def attn_mask_utils() -> bool:
    """Provide ``transformers.modeling_attn_mask_utils`` where transformers no longer has it."""
    try:
        importlib.import_module("transformers.modeling_attn_mask_utils")
        return False
    except ModuleNotFoundError:
        pass
    import transformers

    module = types.ModuleType("transformers.modeling_attn_mask_utils")

    def _prepare_4d_causal_attention_mask(*args, **kwargs):
        raise NotImplementedError(
            f"a Phi-3-based Sa2VA needs transformers.modeling_attn_mask_utils, which transformers "
            f"{transformers.__version__} no longer has; use the transformers version the checkpoint was released with"
        )

    module._prepare_4d_causal_attention_mask = _prepare_4d_causal_attention_mask
    sys.modules[module.__name__] = module
    transformers.modeling_attn_mask_utils = module
    return True


def post_init(cls: type) -> bool:
    """Make ``cls.__init__`` call ``post_init()`` when it did not (transformers 5 needs what it sets)."""
    if getattr(cls, "_raysys_post_init", False) or not hasattr(cls, "post_init"):
        return False
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if "all_tied_weights_keys" not in self.__dict__:
            self.post_init()

    cls.__init__ = __init__
    cls._raysys_post_init = True
    return True


def composite_config(cls: type) -> bool:
    """Carry ``is_composition`` over to ``has_no_defaults_at_init`` where transformers has the new name."""
    from transformers import PretrainedConfig

    if not hasattr(PretrainedConfig, "has_no_defaults_at_init") or "is_composition" not in cls.__dict__:
        return False
    if cls.__dict__.get("has_no_defaults_at_init") == cls.is_composition:
        return False
    cls.has_no_defaults_at_init = cls.is_composition
    return True


@contextlib.contextmanager
def remote_inference_on(remote: Any, device: torch.device | str) -> Iterator[None]:
    """Within: Sa2VA's remote inference code (``predict_forward``) runs on ``device`` when that is not a CUDA
    device. It hard-codes CUDA twice: ``Tensor.cuda()`` calls, redirected to ``device``, and SAM2's video
    inference state (``init_state``), whose devices are set to ``device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        yield
        return
    sam2 = remote.grounding_encoder.sam2_model
    init_state = sam2.init_state

    def _init_state(*args: Any, **kwargs: Any) -> dict:
        state = init_state(*args, **kwargs)
        state["device"] = state["storage_device"] = device
        return state

    cuda = torch.Tensor.cuda
    own = vars(sam2).get("init_state")  # an instance attribute to put back, if there was one
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)
    sam2.init_state = _init_state
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda
        if own is None:
            del sam2.init_state  # the class method shows through again
        else:
            sam2.init_state = own


@contextlib.contextmanager
def forced_generation(lm: Any, token_ids: Sequence[int]) -> Iterator[None]:
    """Within: ``lm.generate`` emits ``token_ids`` whatever the logits say (past their end, the last one again:
    end them with the end token). The model still runs every step (cache, hidden states); only the choice of
    token is forced."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    ids = [int(t) for t in token_ids]

    class _Force(LogitsProcessor):
        def __init__(self) -> None:
            self.start: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.start is None:
                self.start = input_ids.shape[1]
            step = input_ids.shape[1] - self.start
            forced = torch.full_like(scores, float("-inf"))
            forced[:, ids[min(step, len(ids) - 1)]] = 0.0
            return forced

    generate = lm.generate

    def _generate(*args: Any, **kwargs: Any) -> Any:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(_Force())
        return generate(*args, logits_processor=processors, **kwargs)

    own = vars(lm).get("generate")  # an instance attribute to put back, if there was one
    lm.generate = _generate
    try:
        yield
    finally:
        if own is None:
            del lm.generate  # the class method shows through again
        else:
            lm.generate = own


def set_attention(lm: nn.Module, name: str) -> None:
    """Set a transformers LLM's attention implementation ("sdpa", "eager") across transformers versions."""
    if hasattr(lm, "set_attn_implementation"):  # transformers >= 4.56
        lm.set_attn_implementation(name)
    else:
        lm.config._attn_implementation = name


def activation_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers LLM, under the name each
    version has (``gradient_checkpointing_enable`` before transformers 5.25, which deprecates it). Non-reentrant
    checkpoints give LoRA weights inside a layer their gradients although no input requires grad, so the hook
    transformers adds to make the input embeddings require grad is removed again (a needless graph)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(lm, "_require_grads_hooks", None) or getattr(lm, "_require_grads_hook", None):
        lm.disable_input_require_grads()


def prepare(source: str | Path) -> list[str]:
    """Apply every shim this environment needs before loading the checkpoint ``source`` (a folder with
    Sa2VA's remote code, or a hub id); returns the names of the shims applied."""
    applied = []
    if cpu_torchvision():
        applied.append("cpu_torchvision")
    if attn_mask_utils():
        applied.append("attn_mask_utils")
    import transformers
    from packaging.version import Version

    if (
        Version(transformers.__version__) >= Version("5")
        and (Path(source) / "modeling_sa2va_chat.py").is_file()
    ):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        if post_init(get_class_from_dynamic_module(REMOTE_MODEL, str(source))):
            applied.append("post_init")
    if (Path(source) / "configuration_sa2va_chat.py").is_file():
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        if composite_config(get_class_from_dynamic_module(REMOTE_CONFIG, str(source))):
            applied.append("composite_config")
    if applied:
        log.info("Sa2VA remote code: compatibility shims %s", ", ".join(applied))
    return applied
