"""Checks of the Sa2VA adapter against Sa2VA's own remote code, for tests and benchmarks only: the SAM heads,
the [SEG] hidden state of the remote training forward, and the remote ``predict_forward`` mask
(:func:`compare_with_remote`; docs/sa2va_adapter.md)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from policies.sa2va import SEG_TOKEN, Sa2VAFeatures, Sa2VAModel, _param_dtype
from policies.sa2va_preprocess import (
    MAX_DYNAMIC_PATCH,
    MIN_DYNAMIC_PATCH,
    USE_THUMBNAIL,
    as_uint8_images,
    dynamic_tiles,
    normalize_tile,
)


@contextlib.contextmanager
def answering(model: Sa2VAModel, answer: str) -> Iterator[None]:
    """Temporarily teacher-force another answer (e.g. the text the model generated)."""
    previous, model.answer = model.answer, answer
    try:
        yield
    finally:
        model.answer = previous


@contextlib.contextmanager
def remote_generation(model: Sa2VAModel) -> Iterator[None]:
    """Within: the remote ``predict_forward`` can run. Its set-up (``preparing_for_generation``, which
    ``predict_forward`` runs on first use) casts the whole model to one dtype, bfloat16 by default. Here it
    runs with the backbone's dtype, and every tensor it cast (the float32 trained heads of a bfloat16 load)
    gets its own dtype and exact value back on exit."""
    remote = model.model
    dtype = _param_dtype(model.sam2.image_encoder)
    tensors = dict(remote.named_parameters())
    tensors.update(remote.named_buffers())
    saved = {n: t.detach().clone() for n, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    prepare = getattr(remote, "preparing_for_generation", None)
    try:
        if prepare is not None and "torch_dtype" in inspect.signature(prepare).parameters:
            prepare(model.tokenizer, torch_dtype=dtype)
        elif prepare is not None:
            prepare(model.tokenizer)
        yield
    finally:
        for n, t in tensors.items():
            if n in saved:
                t.data = saved[n]


@torch.no_grad()
def sam_heads_difference(
    model: Sa2VAModel,
    images: Any,
    language_embd: torch.Tensor | None = None,
    *,
    features: Sa2VAFeatures | None = None,
) -> float:
    """max |ours - remote| of the selected low-res logits: :meth:`Sa2VAModel.decode` on cached features
    (``features`` if given, else :meth:`Sa2VAModel.encode`) vs the remote ``forward_image`` ->
    ``_prepare_backbone_features`` -> ``_forward_sam_heads`` (Sa2VA's training path) on the same language
    embedding (random if not given)."""
    arr = as_uint8_images(images)
    sam2 = model.sam2
    if language_embd is None:
        language_embd = torch.randn(
            len(arr), 1, int(model.model.grounding_encoder.hidden_dim), device=model.device
        )
    ours = model.decode((features if features is not None else model.encode(arr)).fpn, language_embd)
    with model._sam_autocast():
        feats = sam2.forward_image(model.sam_pixels(arr))
        _, vision_feats, _, feat_sizes = sam2._prepare_backbone_features(feats)
        b, c = vision_feats[-1].shape[1], vision_feats[-1].shape[2]
        pix = (vision_feats[-1] + sam2.no_mem_embed).permute(1, 2, 0).reshape(b, c, *feat_sizes[-1])
        high_res = [
            x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s)
            for x, s in zip(vision_feats[:-1], feat_sizes[:-1], strict=True)
        ]
        remote = sam2._forward_sam_heads(
            backbone_features=pix,
            point_inputs=None,
            mask_inputs=None,
            high_res_features=high_res,
            multimask_output=sam2._use_multimask(is_init_cond_frame=True, point_inputs=None),
            language_embd=language_embd,
        )[3]
    return float((ours - remote.float()).abs().max())


@torch.no_grad()
def remote_training_seg_hidden(model: Sa2VAModel, image: np.ndarray, prompt: str) -> torch.Tensor:
    """[D]: the [SEG] hidden state of the remote *training* forward (``Sa2VAChatModel.forward``, InternVL
    flavour) on the adapter's token ids and tiles: ``hidden_states[-1]`` at the answer's [SEG]."""
    from PIL import Image

    if model.flavour != "internvl":
        raise NotImplementedError("the remote training forward is compared for the InternVL flavour only")
    remote = model.model
    size = int(getattr(remote.config, "force_image_size", None) or remote.config.vision_config.image_size)
    tiles = dynamic_tiles(Image.fromarray(as_uint8_images(image)[0]), min_num=MIN_DYNAMIC_PATCH,
                          max_num=MAX_DYNAMIC_PATCH, image_size=size, use_thumbnail=USE_THUMBNAIL)  # fmt: skip
    pixels = torch.stack([normalize_tile(t, size) for t in tiles]).to(model.device)
    n_tokens = len(tiles) * int(remote.num_image_token)
    ids = torch.tensor([model.prompt_ids(prompt, n_tokens)], device=model.device)
    if not hasattr(remote, "_count"):
        remote._count = 0  # a counter Sa2VA's training loop sets before the first forward
    out = remote({"pixel_values": [pixels], "input_ids": ids, "position_ids": None,
                  "attention_mask": torch.ones_like(ids), "labels": None})  # fmt: skip
    seg = (ids[0] == model.seg_token_idx).nonzero()[-1, 0]
    return out.hidden_states[-1][0, seg]


@torch.no_grad()
def compare_with_remote(
    model: Sa2VAModel,
    image: np.ndarray,
    prompt: str,
    *,
    force_answer: str | None = None,
    features: Sa2VAFeatures | None = None,
    heads: bool = True,
) -> dict[str, Any]:
    """The adapter against the checkpoint's own ``predict_forward`` on one image.

    The remote generates an answer (``force_answer`` forces its tokens, e.g. "It is [SEG]." for a randomly
    initialised model, which never emits [SEG] by itself); the adapter teacher-forces the same answer up to
    its [SEG]; our ``logits > 0`` is compared with the remote's ``sigmoid > 0.5`` mask. Also reports
    :func:`sam_heads_difference` unless ``heads`` is False, and (InternVL) the [SEG] hidden state
    against the remote training forward (:func:`remote_training_seg_hidden`). ``features``: the image's cached
    :meth:`Sa2VAModel.encode` output, to save an encode. Runs on CPU too (the remote's ``.cuda()`` calls are
    redirected to the model's device) and leaves every parameter's dtype and value as it found them.
    """
    from PIL import Image

    from policies.compat import forced_generation, remote_inference_on

    arr = as_uint8_images(image)[0]
    features = features if features is not None else model.encode(arr[None])
    kwargs: dict[str, Any] = {"tokenizer": model.tokenizer}
    if model.flavour == "qwen_vl":
        kwargs["processor"] = model.processor
    text = prompt if "<image>" in prompt else "<image>\n" + prompt
    forced = contextlib.nullcontext()
    if force_answer is not None:
        ids = list(
            model.tokenizer.encode(force_answer + (model.tokenizer.eos_token or ""), add_special_tokens=False)
        )
        lm = model.model.language_model if model.flavour == "internvl" else model.model.model
        forced = forced_generation(lm, ids)
    with remote_generation(model), remote_inference_on(model.model, model.device), forced:
        result = model.model.predict_forward(image=Image.fromarray(arr), text=text, **kwargs)
    prediction = str(result["prediction"])
    report: dict[str, Any] = {"prediction": prediction}
    if heads:
        report["sam_heads_max_abs_diff"] = sam_heads_difference(model, arr, features=features)
    if model.flavour == "internvl":
        ours = model.seg_hidden_states(features, [prompt])[0]
        theirs = remote_training_seg_hidden(model, arr, prompt)
        report["seg_hidden_max_abs_diff"] = float((ours.float() - theirs.float()).abs().max())
        report["seg_hidden_abs_max"] = float(theirs.abs().max())
    if SEG_TOKEN not in prediction or not result["prediction_masks"]:
        report["error"] = "the model generated no [SEG]; nothing to compare"
        return report
    answer = prediction[: prediction.index(SEG_TOKEN) + len(SEG_TOKEN)]
    with answering(model, answer):
        logits = model(arr[None], [prompt], features=features)[0]
    ours = (logits > 0).cpu().numpy()
    theirs = np.asarray(result["prediction_masks"][0])[0].astype(bool)
    union = np.logical_or(ours, theirs).sum()
    report.update(
        answer=answer,
        remote_mask_fraction=float(theirs.mean()),
        mask_iou=float(np.logical_and(ours, theirs).sum() / union) if union else 1.0,
        pixel_agreement=float((ours == theirs).mean()),
        logit_abs_mean=float(logits.abs().mean()),
    )
    return report
