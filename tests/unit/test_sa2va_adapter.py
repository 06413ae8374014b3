"""Sa2VA adapter against the structural fake: shapes, gradient flow, caching, LoRA scope, template, reference,
optimiser step, loading errors. The InternVL flavour's equivalences with Sa2VA's code (SAM heads, the [SEG]
hidden state, the reference policy) are tested against the real remote code in tests/remote/; the fake keeps
what that cannot cover (the Qwen-VL flavour, InternLM2 names, toy sizes for fast shape and optimiser tests).
What each verifies: docs/sa2va_adapter.md."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys

import numpy as np
import pytest
import torch
from fakes.sa2va_fake import PROMPT_TEMPLATE, make_internvl_fake, make_qwen_vl_fake

from policies.lora import LLM_LORA_TARGETS, LoRASpec
from policies.policy import AdapterPolicy
from policies.sa2va import Sa2VAFeatures, Sa2VALoadError, Sa2VAModel, load_sa2va
from policies.sa2va_preprocess import dynamic_tiles
from policies.sa2va_prompts import PROMPT_TEMPLATES
from policies.sa2va_remote_checks import answering, sam_heads_difference

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

KINDS = ("internvl", "internlm2", "qwen_vl")
PROMPT = "Please segment the blood vessels."
# Decoder parts that get no gradient from the selected mask by construction: the IoU head only ranks candidates
# (argmax), the object-score head is not used by Sa2VA's masks, and only the selected
# candidate's hypernetwork MLP reaches the logits (MLP 0 is the single-mask token, unused in multimask mode).
UNREACHABLE = re.compile(r"\.(iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps)\.")


@pytest.fixture(scope="module")
def fakes() -> dict:
    return {
        "internvl": make_internvl_fake(),
        "internlm2": make_internvl_fake(llm="internlm2"),
        "qwen_vl": make_qwen_vl_fake(),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)


def _model(fakes: dict, kind: str) -> Sa2VAModel:
    remote, *rest = fakes[kind]
    return Sa2VAModel.from_modules(copy.deepcopy(remote), *rest)


def _policy(fakes: dict, kind: str, **spec) -> AdapterPolicy:
    model = _model(fakes, kind)
    return AdapterPolicy(model, LoRASpec(backbone=model.backbone, **spec))


def _perturb_trainable(policy: AdapterPolicy, seed: int = 1, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --- interface and shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_logits_at_the_original_image_size(fakes, kind, size) -> None:
    model = _model(fakes, kind)
    imgs = np.random.default_rng(1).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    logits = model(imgs, [PROMPT, "segment the arteries"])
    assert logits.shape == (2, *size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # different images and prompts, different masks


@pytest.mark.parametrize("kind", KINDS)
def test_cached_features_give_identical_logits(fakes, images, kind) -> None:
    policy = _policy(fakes, kind)
    uncached = policy.mask_logits(images, [PROMPT] * 2)
    feats = policy.frozen_features(images)
    assert isinstance(feats, Sa2VAFeatures) and len(feats) == 2
    assert all(not t.requires_grad for t in feats.fpn)
    assert torch.equal(uncached, policy.mask_logits(images, [PROMPT] * 2, features=feats))
    # a cached batch can be split and re-assembled (rollout workers cache per image)
    parts = Sa2VAFeatures.cat([feats.index([1]), feats.index(slice(0, 1))])
    swapped = policy.mask_logits(images[::-1].copy(), [PROMPT] * 2, features=parts)
    torch.testing.assert_close(swapped, uncached.flip(0), rtol=0, atol=1e-6)


def test_prompt_changes_the_mask(fakes, images) -> None:
    model = _model(fakes, "internvl")
    feats = model.encode(images)
    a = model(images, [PROMPT] * 2, features=feats)
    b = model(images, ["find only the thick arteries"] * 2, features=feats)
    assert not torch.allclose(a, b)


def _llm_body(model: Sa2VAModel) -> torch.nn.Module:
    if model.flavour == "qwen_vl":
        return model.model.model.model.language_model
    lm = model.model.language_model
    return lm.model if isinstance(getattr(lm, "model", None), torch.nn.Module) else lm


@pytest.mark.parametrize("kind", [*KINDS, "qwen_vl_deepstack"])
def test_one_padded_llm_forward_equals_one_image_at_a_time(fakes, kind) -> None:
    # rows of different lengths (tile counts or Qwen grids, and prompts, differ) run as one LLM forward padded
    # on the right; each row's logits and gradients are those of a forward of that row alone
    policy = _policy(fakes, kind.removesuffix("_deepstack"))
    model = policy.base
    # Qwen3-VL (deepstack): the processor pixels go through the vision tower inside the LLM call
    model._deepstack = kind.endswith("_deepstack")
    _perturb_trainable(policy)  # LoRA B off zero: LoRA acts
    rng = np.random.default_rng(4)
    sizes = [(48, 80), (40, 40), (30, 90)]
    feats = Sa2VAFeatures.cat([model.encode(rng.integers(0, 256, (1, *s, 3), dtype=np.uint8)) for s in sizes])
    # one output size for the batch's logits; the LLM still sees three different images
    feats = dataclasses.replace(feats, sizes=[(48, 80)] * 3)
    prompts = [PROMPT, "vessels", "find only the thick arteries"]
    calls = []
    hook = _llm_body(model).register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["attention_mask"]), with_kwargs=True
    )
    batched = policy.mask_logits(None, prompts, features=feats)
    hook.remove()
    assert len(calls) == 1 and calls[0] is not None and not calls[0].all()  # one forward, padded rows
    batched.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_trainable_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    rows = [policy.mask_logits(None, [p], features=feats.index([i])) for i, p in enumerate(prompts)]
    single = torch.cat(rows)
    single.square().mean().backward()
    assert not torch.allclose(single[0], single[1], atol=1e-3)  # rows differ: a real comparison
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert any(".lora_A." in n for n in grads) and any(".text_hidden_fcs." in n for n in grads)
    params = dict(policy.named_trainable_parameters())
    for n, g in grads.items():
        torch.testing.assert_close(g, params[n].grad, rtol=1e-4, atol=1e-6)


# --- gradient flow -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_lora_text_hidden_fcs_and_mask_decoder(fakes, images, kind) -> None:
    policy = _policy(fakes, kind)
    with torch.no_grad():  # LoRA B starts at 0, which blocks the gradient of A: give B a value first
        for n, p in policy.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.1)
    policy.mask_logits(images, [PROMPT] * 2).square().mean().backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
    lora = [n for n in grads if ".lora_" in n]
    heads = [n for n in grads if ".text_hidden_fcs." in n]
    decoder = [n for n in grads if ".sam_mask_decoder." in n]
    assert lora and heads and decoder
    for n in lora + heads + [n for n in decoder if not UNREACHABLE.search(n)]:
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert any(".conv_s0." in n and grads[n].abs().sum() > 0 for n in decoder)  # high-res path is trained
    hyper = {int(m.group(1)): grads[n] for n in decoder if (m := re.search(r"hypernetworks_mlps\.(\d)\.", n))}
    # multimask output: the single-mask token 0 is never selected, a candidate token 1..3 is
    assert all(g is None or g.abs().sum() == 0 for i, g in hyper.items() if i == 0)
    assert any(g is not None and g.abs().sum() > 0 for i, g in hyper.items() if i > 0)
    frozen = [p for p in policy.model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_recomputes_the_llm_with_the_same_gradients(fakes, images, kind) -> None:
    # The remote model is in eval mode, where transformers never checkpoints: switching it on puts the LLM in
    # training mode. A non-reentrant checkpoint gives LoRA its gradients from inputs_embeds that need none.
    plain, checkpointed = _policy(fakes, kind), _policy(fakes, kind)
    _perturb_trainable(plain)
    checkpointed.load_trainable_state_dict(plain.trainable_state_dict())  # LoRA A's random init too
    if kind == "internlm2":  # its remote code checkpoints reentrantly
        with pytest.raises(ValueError, match=r"InternLM2 .* not supported"):
            checkpointed.enable_activation_checkpointing()
        return
    checkpointed.enable_activation_checkpointing()

    def grads(policy: AdapterPolicy) -> tuple[dict[str, torch.Tensor], int]:
        layers = [
            m
            for n, m in policy.model.named_modules()
            if re.search(r"language_model\.(model\.)?layers\.0$", n)
        ]
        runs = []
        hook = layers[0].mlp.register_forward_pre_hook(lambda *_: runs.append(1))
        policy.mask_logits(images, [PROMPT] * 2).square().mean().backward()
        hook.remove()
        return {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}, len(runs)

    (expected, runs), (got, reruns) = grads(plain), grads(checkpointed)
    assert (runs, reruns) == (1, 2)  # one batched LLM pass, again in the backward pass
    assert set(got) == set(expected) and any(".lora_A." in n for n in got)
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["internvl", "qwen_vl"])
def test_one_optimiser_step_changes_every_trainable_and_no_frozen_parameter(fakes, images, kind) -> None:
    policy = _policy(fakes, kind)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    target = torch.from_numpy(np.random.default_rng(2).random((2, 48, 80)) > 0.8).float()
    for _ in range(2):  # step 1 moves LoRA B off zero; only then does LoRA A see a gradient
        opt.zero_grad()
        logits = policy.mask_logits(images, [PROMPT] * 2)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        opt.step()
    after = dict(policy.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, sorted(changed - trainable)[:3]  # no frozen parameter moved
    must_change = {n for n in trainable if not UNREACHABLE.search(n)}
    assert must_change <= changed, sorted(must_change - changed)[:3]
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert any(".text_hidden_fcs." in n for n in changed) and any(".transformer." in n for n in changed)


@pytest.mark.parametrize("kind", ["internvl", "qwen_vl"])
def test_bf16_backbone_with_float32_trainable_parts(fakes, images, kind) -> None:
    # what load_sa2va(dtype="bfloat16") builds: frozen backbone in bf16, the RL-trained parts in float32
    remote, *rest = fakes[kind]
    model = Sa2VAModel.from_modules(copy.deepcopy(remote).to(torch.bfloat16), *rest).upcast_trainable_heads()
    policy = AdapterPolicy(model, LoRASpec(backbone=model.backbone))
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    frozen = {
        p.dtype for n, p in policy.model.named_parameters() if ".language_model." in n and ".lora_" not in n
    }
    assert frozen == {torch.bfloat16}
    logits = policy.mask_logits(images, [PROMPT] * 2)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.square().mean().backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
    reached = [n for n in grads if ".lora_B." in n or ".text_hidden_fcs." in n or ".transformer." in n]
    assert reached and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in reached)
    assert sam_heads_difference(model, images) < 1e-3


# --- LoRA scope ----------------------------------------------------------------------------------------------


def _lora_modules(policy: AdapterPolicy) -> list[str]:
    return [n for n, m in policy.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]


@pytest.mark.parametrize("kind", ["internvl", "qwen_vl"])
def test_lora_targets_only_the_language_model(fakes, kind) -> None:
    model = _model(fakes, kind)
    names = [n for n, _ in model.named_modules()]
    # the traps exist: SAM2's attention q/k/v and (Qwen-VL) the vision MLP's gate/up/down projections
    assert any(re.search(r"sam_mask_decoder\.transformer\..*\.q_proj$", n) for n in names)
    if kind == "qwen_vl":
        assert any(re.search(r"\.visual\..*\.gate_proj$", n) for n in names)
    policy = AdapterPolicy(model, LoRASpec(backbone=model.backbone))
    wrapped = _lora_modules(policy)
    assert wrapped and all(re.search(r"language_model\.(model\.)?layers\.\d+\.", n) for n in wrapped)
    assert not [n for n in wrapped if re.search(r"grounding_encoder|visual|vision_model|mlp1", n)]
    suffixes = {n.split(".layers.")[1].split(".", 1)[1] for n in wrapped}
    assert suffixes == set(LLM_LORA_TARGETS["qwen2"])
    assert len(wrapped) == 2 * len(LLM_LORA_TARGETS["qwen2"])  # 2 decoder layers in the fake


def test_internlm2_backbone_gets_lora_on_its_own_names(fakes) -> None:
    model = _model(fakes, "internlm2")
    assert model.backbone == "internlm2"
    wrapped = _lora_modules(AdapterPolicy(model, LoRASpec(backbone=model.backbone)))
    targets = {".".join(n.split(".")[-2:]) for n in wrapped}
    assert targets == set(LLM_LORA_TARGETS["internlm2"])
    assert len(wrapped) == 2 * 5 and all(".language_model.model.layers." in n for n in wrapped)


def test_decoder_lora_mode_wraps_only_the_mask_decoder_transformer(fakes) -> None:
    policy = _policy(fakes, "internvl", decoder_mode="lora")
    wrapped = _lora_modules(policy)
    sam = [n for n in wrapped if "grounding_encoder" in n]
    assert sam and all(".sam_mask_decoder.transformer." in n for n in sam)
    assert not [n for n in sam if "memory_attention" in n]


def test_backbone_comes_from_the_llm_architecture(fakes) -> None:
    assert [_model(fakes, k).backbone for k in KINDS] == ["qwen2", "internlm2", "qwen2"]
    remote, tok = make_internvl_fake()
    remote.config.llm_config.architectures = ["MysteryForCausalLM"]
    with pytest.raises(ValueError, match="MysteryForCausalLM"):
        Sa2VAModel.from_modules(remote, tok)


# --- prompt and template ------------------------------------------------------------------------------------


def test_template_comes_from_the_config(fakes) -> None:
    model = _model(fakes, "internvl")
    tok = model.tokenizer
    qwen_ids = model.prompt_ids(PROMPT, 8)
    model.model.config.template = "phi3-chat"  # Sa2VA normalises '-' to '_'
    phi3_ids = model.prompt_ids(PROMPT, 8)
    assert qwen_ids != phi3_ids
    assert tok.decode(phi3_ids).startswith("<|user|>\n<img>")
    assert tok.decode(phi3_ids).endswith("<|end|>\n<|assistant|>\nIt is [SEG].<|end|>")
    assert tok.decode(qwen_ids).endswith("<|im_start|>assistant\nIt is [SEG].<|im_end|>")
    model.model.config.template = "no_such_template"
    with pytest.raises(ValueError, match="no_such_template"):
        model.prompt_ids(PROMPT, 8)


def test_own_template_table_is_used_when_the_remote_module_has_none(fakes, monkeypatch) -> None:
    model = _model(fakes, "internvl")
    with_remote_table = model.prompt_ids(PROMPT, 4)
    monkeypatch.delattr(sys.modules[type(model.model).__module__], "PROMPT_TEMPLATE")
    model._layouts.clear()
    assert model.prompt_ids(PROMPT, 4) == with_remote_table
    for name in PROMPT_TEMPLATES.keys() & PROMPT_TEMPLATE.keys():
        assert PROMPT_TEMPLATES[name]["INSTRUCTION"] == PROMPT_TEMPLATE[name]["INSTRUCTION"]


def test_internvl_prompt_layout_and_bos(fakes) -> None:
    for kind, bos in (("internvl", False), ("internlm2", True)):
        model = _model(fakes, kind)
        tok = model.tokenizer
        ids = model.prompt_ids(PROMPT, 12)
        text = tok.decode(ids)
        assert ids.count(model.img_context_token_id) == 12 and ids.count(model.seg_token_idx) == 1
        assert "<img>" + "<IMG_CONTEXT>" * 12 + "</img>\n" + PROMPT in text
        assert (ids[0] == tok.convert_tokens_to_ids("<s>")) is bos  # BOS only where the tokenizer adds one
        assert ids.count(tok.convert_tokens_to_ids("<s>")) == int(bos)


def test_qwen_prompt_with_and_without_config_template(fakes) -> None:
    model = _model(fakes, "qwen_vl")
    text = model.tokenizer.decode(model.prompt_ids(PROMPT, 6))
    assert text.startswith("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>\n")
    remote, tok, processor = make_qwen_vl_fake(template=None)
    chat = Sa2VAModel.from_modules(remote, tok, processor)
    text = chat.tokenizer.decode(chat.prompt_ids(PROMPT, 6))
    assert text.startswith("<|im_start|>system\n")  # the processor's chat template, as predict_forward uses
    assert "<|image_pad|>" * 6 + "<|vision_end|>" + PROMPT in text and text.endswith("It is [SEG].<|im_end|>")
    images = np.random.default_rng(3).integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
    assert chat(images, [PROMPT]).shape == (1, 40, 56)


def test_answer_must_contain_seg(fakes) -> None:
    model = _model(fakes, "internvl")
    with answering(model, "Sure, the segmentation result is [SEG]."):
        assert "result is [SEG]" in model.tokenizer.decode(model.prompt_ids(PROMPT, 4))
    with answering(model, "no mask"), pytest.raises(ValueError, match=r"\[SEG\]"):
        model.prompt_ids(PROMPT, 4)


# --- consistency with the remote code paths ----------------------------------------------------------------


def test_decode_matches_the_remote_forward_sam_heads_qwen(fakes, images) -> None:
    # InternVL: against the real remote code in tests/remote/
    model = _model(fakes, "qwen_vl")
    assert sam_heads_difference(model, images) < 1e-5


def test_qwen_cached_vision_matches_the_models_own_vision_path(fakes, images) -> None:
    # cached vision embeddings + our scatter + our M-RoPE positions == the model computing both itself
    model = _model(fakes, "qwen_vl")
    cached = model(images, [PROMPT] * 2)
    model._deepstack = True  # the Qwen3-VL path: pixels go through the vision tower inside the LLM call
    feats = model.encode(images)
    assert feats.vision == [None, None] and all(p is not None for p in feats.pixel_values)
    torch.testing.assert_close(model(images, [PROMPT] * 2, features=feats), cached, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # min/max_pixels, as Sa2VA training passes them
def test_seg_hidden_state_is_the_training_selection_qwen(fakes, images) -> None:
    # Sa2VA's Qwen-VL training call: model(input_ids, attention_mask, pixel_values, image_grid_thw, ...)
    from PIL import Image

    model = _model(fakes, "qwen_vl")
    remote = model.model
    pix = model.processor.image_processor(
        images=[Image.fromarray(images[0])],
        min_pixels=remote.min_pixels,
        max_pixels=remote.max_pixels,
        return_tensors="pt",
    )
    n = int(pix["image_grid_thw"].prod()) // 4
    ids = torch.tensor([model.prompt_ids(PROMPT, n)])
    out = remote.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pix["pixel_values"],
        image_grid_thw=pix["image_grid_thw"],
        mm_token_type_ids=(ids == model.img_context_token_id).int(),  # transformers 5's processor output
        output_hidden_states=True,
    )
    expected = out.hidden_states[-1][ids == model.seg_token_idx]
    with torch.no_grad():
        got = model.seg_hidden_states(model.encode(images[:1]), [PROMPT])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


# --- reference policy ----------------------------------------------------------------------------------------


def test_reference_is_the_unadapted_model_qwen(fakes, images) -> None:
    # InternVL: against the real remote code in tests/remote/
    policy = _policy(fakes, "qwen_vl")
    feats = policy.frozen_features(images)
    original = policy.mask_logits(images, [PROMPT] * 2, features=feats).detach()
    _perturb_trainable(policy)
    moved = policy.mask_logits(images, [PROMPT] * 2, features=feats).detach()
    assert not torch.allclose(moved, original, atol=1e-4)
    with policy.reference():
        ref = policy.mask_logits(images, [PROMPT] * 2, features=feats).detach()
    torch.testing.assert_close(ref, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.mask_logits(images, [PROMPT] * 2, features=feats).detach(), moved)


# --- preprocessing -------------------------------------------------------------------------------------------


def test_dynamic_tiles_follow_internvl_tiling() -> None:
    from PIL import Image

    def tiles(w: int, h: int, size: int) -> list:
        return dynamic_tiles(
            Image.new("RGB", (w, h)), min_num=1, max_num=12, image_size=size, use_thumbnail=True
        )

    assert len(tiles(565, 584, 448)) == 1  # DRIVE: one tile, no thumbnail
    wide = tiles(64, 32, 32)  # 2:1 -> grid (2, 1) + thumbnail
    assert len(wide) == 3 and all(t.size == (32, 32) for t in wide)
    # (2, 1) and (4, 2) tie on aspect; a large image fills the 4x2 grid (area > half of 8 tiles) -> 8 + thumbnail
    assert len(tiles(200, 100, 32)) == 9
    # 64x64 with 32² tiles: (1,1) and (2,2) tie on aspect; the image fills 2x2 (area > half) -> 4 + thumbnail
    assert len(tiles(64, 64, 32)) == 5


def test_bad_inputs_are_named(fakes, images) -> None:
    model = _model(fakes, "internvl")
    with pytest.raises(ValueError, match="2 images"):
        model(images, [PROMPT])
    with pytest.raises(ValueError, match="float"):
        model(images.astype(np.float32) / 255, [PROMPT] * 2)
    feats = model.encode(images)
    with pytest.raises(ValueError, match="size"):
        model(images[:, :40], [PROMPT] * 2, features=feats)


# --- loading -------------------------------------------------------------------------------------------------


def test_load_missing_local_checkpoint_names_the_path(tmp_path, monkeypatch) -> None:
    import transformers

    def no_call(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached for a missing local folder")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_call)
    missing = tmp_path / "no-such-sa2va-checkpoint"
    with pytest.raises(Sa2VALoadError, match="no-such-sa2va-checkpoint") as err:
        load_sa2va(str(missing))
    assert "no model-hub access" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Sa2VALoadError, match=r"config\.json"):
        load_sa2va(str(empty))
    with pytest.raises(ValueError, match="dtype"):
        load_sa2va(str(empty), dtype="int8")


def test_remote_code_runs_only_when_the_user_opts_in(tmp_path, monkeypatch) -> None:
    import transformers

    from policies.config import PolicyConfig

    def no_call(*args, **kwargs):
        raise AssertionError("from_pretrained must not run a checkpoint's code without trust_remote_code")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_call)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modeling_sa2va_chat.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(Sa2VALoadError, match=r"modeling_sa2va_chat\.py.*trust_remote_code=True"):
        load_sa2va(str(tmp_path), dtype="float32")
    with pytest.raises(ValueError, match=r"policy\.trust_remote_code"):
        PolicyConfig(kind="sa2va", checkpoint=str(tmp_path))


def test_load_unreachable_hub_id_says_there_is_no_hub_access(monkeypatch) -> None:
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    with pytest.raises(Sa2VALoadError, match="ByteDance/Sa2VA-1B") as err:
        load_sa2va("ByteDance/Sa2VA-1B", trust_remote_code=True)
    assert "no model-hub access" in str(err.value) and "couldn't connect" in str(err.value)


@pytest.mark.parametrize("kind", ["internlm2", "qwen_vl"])
def test_load_calls_from_pretrained_with_remote_code_and_builds_the_policy(
    fakes, tmp_path, monkeypatch, kind
):
    import transformers

    from policies.config import PolicyConfig
    from policies.factory import build_policy

    (tmp_path / "config.json").write_text("{}")
    remote, tok, *processor = fakes[kind]
    calls: dict[str, dict] = {}

    def fake_loader(name, value):
        def from_pretrained(path, **kwargs):
            calls[name] = {"path": path, **kwargs}
            return value

        return from_pretrained

    monkeypatch.setattr(
        transformers.AutoModel, "from_pretrained", fake_loader("model", copy.deepcopy(remote))
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_loader("tokenizer", tok))
    monkeypatch.setattr(
        transformers.AutoProcessor, "from_pretrained", fake_loader("processor", *processor or [None])
    )
    policy = build_policy(
        PolicyConfig(kind="sa2va", checkpoint=str(tmp_path), dtype="float32", trust_remote_code=True)
    )
    assert calls["model"]["path"] == str(tmp_path) and calls["model"]["trust_remote_code"] is True
    assert calls["model"]["low_cpu_mem_usage"] is True
    assert calls["model"].get("dtype", calls["model"].get("torch_dtype")) is torch.float32
    assert calls["tokenizer"]["trust_remote_code"] is True
    assert ("processor" in calls) == (kind == "qwen_vl")
    assert policy.spec.backbone == policy.base.backbone == ("internlm2" if kind == "internlm2" else "qwen2")
    images = np.random.default_rng(4).integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    assert policy.mask_logits(images, [PROMPT]).shape == (1, 32, 48)
