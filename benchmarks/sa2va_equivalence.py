"""How closely the adapter follows Sa2VA's own remote code, in numbers -> benchmarks/results/sa2va_equivalence.json.

    .venv/bin/python benchmarks/sa2va_equivalence.py [--remote DIR] [--json PATH]

On a random-init release folder (``policies.sa2va_random``, shape "test": real remote code, tiny LLM and ViT, full
SAM2) with non-zero LoRA and perturbed heads, float32 on CPU, one 48 x 96 image:
- ``compare_with_remote``: SAM heads, the [SEG] hidden state against the remote training forward, and the
  teacher-forced mask against the remote ``predict_forward`` forced to answer "It is [SEG].";
- SDPA against the remote's eager attention ([SEG] hidden state);
- ``raysys export``: the merged folder's logits against the adapter's, and the same comparisons for the merged
  folder loaded back.
The tests in tests/remote/ assert bounds on the same quantities; this records the values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch

PROMPT = "Please segment the blood vessels."
ANSWER = "It is [SEG]."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default=str(harness.SA2VA_REMOTE))
    parser.add_argument("--json", default=str(harness.result_path("sa2va_equivalence")))
    args = parser.parse_args()
    if not (Path(args.remote) / "modeling_sa2va_chat.py").is_file():
        print(f"Sa2VA's remote code is not at {args.remote}: pass --remote", file=sys.stderr)
        return 2

    from policies.checkpoint import save_trainable
    from policies.compat import set_attention
    from policies.config import PolicyConfig
    from policies.factory import build_policy
    from policies.sa2va import load_sa2va
    from policies.sa2va_random import build_checkpoint
    from policies.sa2va_remote_checks import compare_with_remote
    from raysys.cli import main as cli

    tmp = Path(tempfile.mkdtemp(prefix="sa2va_equivalence_"))
    checkpoint = build_checkpoint(args.remote, tmp / "sa2va_random", "test")
    policy = build_policy(
        PolicyConfig(kind="sa2va", checkpoint=str(checkpoint), dtype="float32", trust_remote_code=True)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02, generator=gen)
            elif ".modules_to_save." in n:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    image = (np.random.default_rng(0).random((48, 96, 3)) * 255).astype(np.uint8)
    features = policy.frozen_features(image[None])
    adapter = compare_with_remote(policy.base, image, PROMPT, force_answer=ANSWER, features=features)

    lm = policy.base.model.language_model
    with torch.no_grad():
        sdpa = policy.base.seg_hidden_states(features, [PROMPT])
        set_attention(lm, "eager")
        eager = policy.base.seg_hidden_states(features, [PROMPT])
        set_attention(lm, "sdpa")

    save_trainable(policy, tmp / "rl")
    os.chdir(tmp)
    rc = cli(["export", "policy.kind=sa2va", f"policy.checkpoint={checkpoint}", "policy.trust_remote_code=true",
              "policy.dtype=float32", "data.size=64", "data.n_val=1", "--checkpoint", str(tmp / "rl"),
              "--out", str(tmp / "ex")])  # fmt: skip
    if rc != 0:
        print("raysys export failed", file=sys.stderr)
        return 1
    export = json.loads((tmp / "ex" / "export.json").read_text())
    merged = load_sa2va(str(tmp / "ex" / "merged"), dtype="float32", trust_remote_code=True)
    again = compare_with_remote(merged, image, PROMPT, force_answer=ANSWER, heads=False)
    with torch.no_grad():
        ours = policy.mask_logits(image[None], [PROMPT], features=features)[0]
        theirs = merged(image[None], [PROMPT])[0]

    import transformers

    out = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "image_hw": list(image.shape[:2]),
        "adapter_vs_remote": adapter,
        "sdpa_vs_eager_seg_hidden_max_abs_diff": float((sdpa - eager).abs().max()),
        "export_max_logit_diff": export["max_logit_diff"],
        "merged_adapter_vs_trained_adapter_max_logit_diff": float((ours - theirs).abs().max()),
        "merged_vs_its_remote_code": again,
    }
    harness.write_result("sa2va_equivalence", out, args.json)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
