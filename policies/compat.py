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
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path

log = logging.getLogger(__name__)

REMOTE_MODEL = "modeling_sa2va_chat.Sa2VAChatModel"


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
    if applied:
        log.info("Sa2VA remote code: compatibility shims %s", ", ".join(applied))
    return applied
