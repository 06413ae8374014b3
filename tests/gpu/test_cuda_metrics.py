"""On a CUDA machine, masks computed on the GPU score the same as on the CPU."""

from __future__ import annotations

import numpy as np

from envs.metrics import dice
from envs.synthetic import generate_fundus


def test_gpu_thresholded_mask_scores_like_cpu() -> None:
    import torch

    s = generate_fundus(0, 128)
    g = s.image[..., 1].astype(np.float32)
    t = float(g[s.fov].mean())
    pred_gpu = (torch.from_numpy(g).cuda() < t).cpu().numpy()
    pred_cpu = g < t
    assert np.array_equal(pred_gpu & s.fov, pred_cpu & s.fov)
    assert dice(pred_gpu, s.mask, fov=s.fov) == dice(pred_cpu, s.mask, fov=s.fov)
