"""The merged Sa2VA export's tensor check: it passes on what was written and names what differs."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.sa2va_export import save_weights
from raysys.evaluate import _check_written_tensors

pytestmark = pytest.mark.unit


def test_written_tensors_are_checked_by_name_dtype_and_value(tmp_path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    merged = types.SimpleNamespace(model=module)
    path = save_weights(module, tmp_path)
    _check_written_tensors(merged, tmp_path)  # as written: no error
    tensors = load_file(str(path))
    tensors["1.weight"] = tensors["1.weight"].float()  # the bfloat16 layer stored in another dtype
    del tensors["0.bias"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(
        RuntimeError,
        match=r"1 tensors missing \(e\.g\. \['0\.bias'\]\), 1 changed \(e\.g\. \['1\.weight'\]\)",
    ):
        _check_written_tensors(merged, tmp_path)
