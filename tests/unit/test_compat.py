"""policies/compat.py: each shim applies only where what it replaces is missing, and only once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from policies import compat

compat.cpu_torchvision()  # before the transformers imports below (this file must pass on its own)
pytestmark = pytest.mark.unit


def test_import_shims_apply_exactly_when_the_environment_lacks_the_original() -> None:
    """In a fresh interpreter (nothing imported yet): what each import shim finds, and what it does."""
    script = textwrap.dedent(
        """
        import importlib, json, subprocess, sys
        plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
        has_mask_utils = subprocess.run(
            [sys.executable, "-c", "import transformers.modeling_attn_mask_utils"], capture_output=True
        ).returncode == 0
        from policies import compat
        first = compat.cpu_torchvision()
        import torchvision.transforms
        stub = compat.attn_mask_utils()
        from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask as fn
        try:
            fn()
            call = "ran"
        except NotImplementedError as exc:
            call = str(exc)
        except TypeError:
            call = "original"
        print(json.dumps({
            "plain_ok": plain.returncode == 0, "plain_err": plain.stderr[-300:], "first": first,
            "again": compat.cpu_torchvision(), "has_mask_utils": has_mask_utils, "stub": stub,
            "stub_again": compat.attn_mask_utils(), "call": call,
        }))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # the torchvision shim is used exactly when a plain import dies on the missing C ops
    assert r["first"] == (not r["plain_ok"] and "torchvision::" in r["plain_err"]), r
    assert r["again"] is False
    assert r["stub"] == (not r["has_mask_utils"]) and r["stub_again"] is False
    if r["stub"]:  # the stand-in names the problem when a Phi-3 checkpoint would call it
        assert "Phi-3" in r["call"] and "transformers" in r["call"]
    else:
        assert r["call"] == "original"


def test_post_init_is_added_once_and_only_where_init_skips_it() -> None:
    """The shim is for transformers 5 (``prepare`` applies it there only): it knows post_init ran by the
    attribute post_init sets."""
    import transformers
    from packaging.version import Version
    from transformers import PretrainedConfig, PreTrainedModel

    calls = []

    class Base(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.layer = torch.nn.Linear(2, 2)

        def post_init(self):
            calls.append(type(self).__name__)
            super().post_init()

    class Skips(Base):
        pass

    class Calls(Base):
        def __init__(self, config):
            super().__init__(config)
            self.post_init()

    assert compat.post_init(Skips) is True and compat.post_init(Skips) is False
    Skips(PretrainedConfig())
    assert calls == ["Skips"]
    if Version(transformers.__version__) >= Version("5"):
        calls.clear()
        compat.post_init(Calls)
        Calls(PretrainedConfig())  # its own post_init ran; the wrapper must not run it again
        assert calls == ["Calls"]


def test_composite_config_carries_the_old_flag_to_the_new_name() -> None:
    from transformers import PretrainedConfig

    class Composite(PretrainedConfig):
        model_type = "composite_test"
        is_composition = True

    class Plain(PretrainedConfig):
        model_type = "plain_test"

    if hasattr(PretrainedConfig, "has_no_defaults_at_init"):  # transformers >= 4.57
        assert compat.composite_config(Composite) is True and Composite.has_no_defaults_at_init is True
        assert compat.composite_config(Composite) is False
    else:
        assert compat.composite_config(Composite) is False
    assert compat.composite_config(Plain) is False and "has_no_defaults_at_init" not in Plain.__dict__


def test_remote_inference_on_cpu_redirects_cuda_and_restores_everything() -> None:
    class Sam2:
        def init_state(self, images):
            return {"device": torch.device("cuda"), "storage_device": torch.device("cuda"), "n": len(images)}

    sam2 = Sam2()
    remote = types.SimpleNamespace(grounding_encoder=types.SimpleNamespace(sam2_model=sam2))
    original = torch.Tensor.cuda
    with compat.remote_inference_on(remote, "cpu"):
        assert torch.ones(2).cuda().device == torch.device("cpu")
        state = sam2.init_state([1, 2])
        assert state == {"device": torch.device("cpu"), "storage_device": torch.device("cpu"), "n": 2}
    assert torch.Tensor.cuda is original and "init_state" not in vars(sam2)
    assert sam2.init_state([1])["device"] == torch.device("cuda")


def test_forced_generation_emits_the_given_tokens_and_unpatches() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    lm = Qwen2ForCausalLM(config).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        free = lm.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=39, pad_token_id=0)
        with compat.forced_generation(lm, [5, 7, 39]):
            forced = lm.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=39, pad_token_id=0)
    assert forced[0, 3:].tolist() == [5, 7, 39]  # stops at the end token
    assert free[0, 3:].tolist() != [5, 7, 39] and "generate" not in vars(lm)
