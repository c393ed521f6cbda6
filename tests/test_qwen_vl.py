"""Qwen2-VL and Qwen2.5-VL (tiny random weights, saved and reloaded): exactness, M-RoPE positions,
generate, batching, budgets, errors, videos, and the VisionZip signals against an eager reference."""

from __future__ import annotations

import copy
import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmzip
import vlmzip.methods
from vlmzip.adapters.qwen_vl import load_processor
from vlmzip.builders.qwen_vl import ARCHS, QwenVLSpec, build_qwen_vl, build_tokenizer, qwen_config

QWEN_ARCHS = {arch.name: arch for arch in ARCHS}

NEW = 5
# Three images with three different grids (patch 8, merge 2): 8x8, 6x10 and 9x6 merged tokens.
SIZES = [(130, 120), (160, 96), (96, 144)]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]


@pytest.fixture(scope="module", params=["2", "2.5", "3"], ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def qwen_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"tiny-qwen{request.param}")
    build_qwen_vl(out, QwenVLSpec(), version=request.param)
    return request.param, out


def load(qwen_dir, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(qwen_dir[1], **kwargs).eval()


@pytest.fixture()
def model(qwen_dir):
    return load(qwen_dir)


@pytest.fixture(scope="module")
def processor(qwen_dir):
    return load_processor(qwen_dir[1])


def prompt(processor, question: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def batch(processor):
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def vanilla_counts(inputs) -> list[int]:
    return [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]


class LMInputs:
    """A pre-hook on the language model that records every call's position ids and mask."""

    def __init__(self, model) -> None:
        self.calls: list[dict] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        self.calls.append({k: kwargs.get(k) for k in ("position_ids", "attention_mask", "inputs_embeds")})


def test_grids_differ_per_image(batch):
    inputs, _, _ = batch
    assert len(set(vanilla_counts(inputs))) == 3
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"


def test_keep_all_reproduces_vanilla_logits(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    for method in ("visionzip", "random"):
        with vlmzip.compressed(model, method, ratio=1.0):
            torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)


def test_kept_tokens_keep_their_vanilla_positions(model, batch):
    inputs, _, _ = batch
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vanilla, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    vlmzip.compress(model, "visionzip", tokens=10)
    seen = LMInputs(model)
    with vlmzip.recorded(model) as selections, torch.no_grad():
        model(**inputs)
    got, got_mask = seen.calls[0]["position_ids"], seen.calls[0]["attention_mask"]
    assert len(selections) == 3  # one per image: every grid differs
    image_id = model.config.image_token_id
    for b in range(ids.shape[0]):
        cols = mask[b].nonzero().squeeze(1)
        run = (ids[b] == image_id).nonzero().squeeze(1)
        start, end = int(run[0]), int(run[-1]) + 1
        kept = selections[b].indices[0]
        expected = torch.cat([
            vanilla[:, b, cols[cols < start]],  # text before the image
            vanilla[:, b, start + kept],  # each kept token at its source token's (t, h, w)
            vanilla[:, b, cols[cols >= end]],  # text after the image keeps its vanilla positions
        ], dim=1)
        assert torch.equal(got[:, b, got_mask[b].bool()], expected)
    # the first decode step continues at the vanilla sequence's next position
    seen.calls.clear()
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    decode = seen.calls[-1]["position_ids"]
    assert torch.equal(decode[:, :, -1], (vanilla.amax(dim=(0, 2)) + 1).expand(3, -1))
    seen.handle.remove()


def test_cached_generate_equals_uncached_recomputation(model, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=8)
    cached = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_len], inputs["input_ids"])
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            types = torch.cat([types, torch.zeros_like(token)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize(("method", "knobs"), [("visionzip", {"tokens": 8}), ("fastv", {"layer": 1})])
def test_batch_equals_single_runs(model, processor, batch, method, knobs):
    inputs, images, texts = batch
    vlmzip.compress(model, method, **knobs)
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    new = batched.sequences[:, inputs["input_ids"].shape[1]:]
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        single_inputs = processor(images=[image], text=[text], return_tensors="pt")
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        alone = single.sequences[0, single_inputs["input_ids"].shape[1]:]  # ends early when it ends with EOS
        assert torch.equal(alone, new[i, : alone.shape[0]])
        assert (new[i, alone.shape[0]:] == model.generation_config.pad_token_id).all(), "padding after its EOS"
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


def test_beams_with_keep_all_equal_vanilla_beams(model, batch):
    """generate expands rows for beams after encoding the images: positions are repeated per row."""
    inputs, _, _ = batch
    kwargs = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    vanilla = model.generate(**inputs, **kwargs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        same = model.generate(**inputs, **kwargs)
    assert torch.equal(vanilla.sequences, same.sequences)
    for a, b in zip(vanilla.scores, same.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_multi_turn_continues_the_same_cache(model, processor, batch):
    _, images, texts = batch
    first = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    vlmzip.compress(model, "visionzip", tokens=8)
    turn1 = model.generate(**first, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    follow = processor.tokenizer("<|im_end|>\n<|im_start|>user\nand the shape ?<|im_end|>\n<|im_start|>assistant\n",
                                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    mask = torch.ones_like(ids)
    cached_len = turn1.cache.get_seq_length()
    turn2 = model.generate(input_ids=ids, attention_mask=mask, cache=turn1.cache, max_new_tokens=NEW, do_sample=False)
    assert turn1.cache.get_seq_length() > cached_len, "the second turn extended the first turn's cache"
    types = (ids == model.config.image_token_id).int()
    fresh = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                           pixel_values=first["pixel_values"], image_grid_thw=first["image_grid_thw"],
                           max_new_tokens=NEW, do_sample=False)
    assert torch.equal(turn2, fresh)


def test_decompress_restores_exactly(model, batch):
    inputs, _, _ = batch
    before = logits(model, inputs)
    vlmzip.compress(model, "visionzip", tokens=8)
    squeezed = logits(model, inputs)
    assert squeezed.shape[1] < inputs["input_ids"].shape[1]
    vlmzip.decompress(model)
    assert torch.equal(before, logits(model, inputs))
    for name in ("forward", "generate", "_vlmzip", "_prepare_position_ids_for_generation"):
        assert name not in vars(model)
    for name in ("get_image_features", "compute_3d_position_ids", "forward"):
        assert name not in vars(model.model)


def test_deepcopy_of_a_compressed_model(model, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=8)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, inputs), logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize(("method", "knobs", "keep"), [
    ("visionzip", {"tokens": 6}, lambda n: 6),
    ("random", {"tokens": 7}, lambda n: 7),
    ("random", {"ratio": 0.25}, lambda n: round(0.25 * n)),
])
def test_pre_llm_methods_send_the_budget(model, processor, method, knobs, keep):
    inputs = processor(images=[random_image(0, SIZES[1])], text=[prompt(processor, "how many ?")],
                       return_tensors="pt")
    (n,) = vanilla_counts(inputs)
    with vlmzip.compressed(model, method, **knobs):
        out = logits(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] - n + keep(n)


def test_fastv_keeps_its_budget_inside_the_llm(model, processor):
    inputs = processor(images=[random_image(0, SIZES[1])], text=[prompt(processor, "how many ?")],
                       return_tensors="pt")
    (n,) = vanilla_counts(inputs)
    length = inputs["input_ids"].shape[1]
    vlmzip.compress(model, "fastv", layer=1)  # the paper's budget: half of each image's tokens stay
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.cache.layers[0].keys.shape[2] == length
    assert out.cache.layers[1].keys.shape[2] == length - n + round(0.5 * n)


def test_too_many_tokens_names_the_images_count(model, batch):
    inputs, _, _ = batch
    smallest = min(vanilla_counts(inputs))
    vlmzip.compress(model, "visionzip", tokens=smallest + 1)
    with pytest.raises(ValueError, match=rf"larger than the {smallest} visual tokens image \d of this batch has"):
        logits(model, inputs)


def test_position_ids_with_images_are_refused(model, batch):
    inputs, _, _ = batch
    vlmzip.compress(model, "visionzip", tokens=8)
    with pytest.raises(ValueError, match="computes its M-RoPE positions itself"):
        model(**inputs, position_ids=torch.zeros(3, *inputs["input_ids"].shape, dtype=torch.long))


def video_inputs(model, processor, with_image: bool):
    """A prompt with a 2 x 8 x 8 video grid (32 placeholders; no video processor here, so random patches). Qwen3-VL
    writes each temporal step as its own run after a timestamp ("1 seconds"), as its processor does."""
    config = model.config.vision_config
    grid = torch.tensor([[2, 8, 8]])
    text = prompt(processor, "what happens ?", image=with_image)
    images = [random_image(3, SIZES[2])] if with_image else None
    inputs = dict(processor(images=images, text=[text], return_tensors="pt"))
    tokenizer = processor.tokenizer
    start, end = tokenizer.convert_tokens_to_ids("<|vision_start|>"), tokenizer.convert_tokens_to_ids("<|vision_end|>")
    if model.config.model_type.startswith("qwen3"):
        runs = [[*tokenizer(f"{t} seconds", add_special_tokens=False)["input_ids"], start,
                 *[model.config.video_token_id] * 16, end] for t in (1, 2)]
        video = torch.tensor([[token for run in runs for token in run]])
    else:
        video = torch.tensor([[start] + [model.config.video_token_id] * 32 + [end]])
    ids = inputs["input_ids"]
    at = int((ids[0] == tokenizer.convert_tokens_to_ids("what")).nonzero()[0])  # the video goes before the question
    inputs["input_ids"] = torch.cat([ids[:, :at], video, ids[:, at:]], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
    inputs["pixel_values_videos"] = torch.randn(int(grid.prod()), patch, generator=torch.Generator().manual_seed(0))
    inputs["video_grid_thw"] = grid
    types = torch.zeros_like(inputs["input_ids"], dtype=torch.int)
    types[inputs["input_ids"] == model.config.image_token_id] = 1
    types[inputs["input_ids"] == model.config.video_token_id] = 2
    inputs["mm_token_type_ids"] = types
    return inputs


def test_videos_are_compressed_too(model, processor):
    only_video = video_inputs(model, processor, with_image=False)
    mixed = video_inputs(model, processor, with_image=True)
    before_video, before_mixed = logits(model, only_video), logits(model, mixed)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, mixed), before_mixed, atol=1e-5, rtol=0)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, only_video), before_video, atol=1e-5, rtol=0)
    vlmzip.compress(model, "visionzip", tokens=6)  # the video too: 6 of its 32 tokens, 3 per temporal patch
    assert logits(model, only_video).shape[1] == only_video["input_ids"].shape[1] - 32 + 6
    (n,) = vanilla_counts(mixed)
    assert logits(model, mixed).shape[1] == mixed["input_ids"].shape[1] - n + 6 - 32 + 6
    out = model.generate(**mixed, max_new_tokens=3, min_new_tokens=3, do_sample=False)  # random weights may end early
    assert out.shape[1] == mixed["input_ids"].shape[1] + 3


def test_visionzip_signals_match_an_eager_attention(qwen_dir, processor, batch, monkeypatch):
    """received_attention / keys handed to the method equal those rebuilt from the signal block's eager
    attention probabilities, mapped to the merger's output order by matching the merged tokens."""
    inputs, _, _ = batch
    model = load(qwen_dir, attn_implementation="eager")
    visual = model.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    block = max(full) if full else len(visual.blocks) - 1
    if full:
        assert block != len(visual.blocks) - 1, "the test model's last block is windowed"
    attn = visual.blocks[block].attn
    module = importlib.import_module(type(attn).__module__)
    eager = module.eager_attention_forward
    probs: list[torch.Tensor] = []

    def recording(mod, *args, **kwargs):
        out, weights = eager(mod, *args, **kwargs)
        if mod is attn:
            probs.append(weights[0])  # (H, n, n) of one segment
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    qkv: list[torch.Tensor] = []
    block_out: list[torch.Tensor] = []
    attn.qkv.register_forward_hook(lambda m, a, out: qkv.append(out))
    visual.blocks[-1].register_forward_hook(lambda m, a, out: block_out.append(out))
    vlmzip.compress(model, "visionzip", tokens=8)
    state = vlmzip.api.state_of(model)
    handed: list = []
    select = state.select
    monkeypatch.setattr(state, "select",
                        lambda tokens, keep, units=None: handed.append(tokens) or select(tokens, keep, units))
    with torch.no_grad():
        model(**inputs)
    # per patch, in the blocks' order: mean over heads and the segment's queries, then summed per 2x2 group
    received = torch.cat([p.float().mean(dim=(0, 1)) for p in probs]).view(-1, 4).sum(dim=1)
    heads = attn.num_heads
    keys = qkv[0].float().view(qkv[0].shape[0], 3, heads, -1)[:, 1].mean(dim=1)
    keys = keys.view(-1, 4, keys.shape[-1]).mean(dim=1)
    # the blocks' group order -> the merger's output order, found by matching merged tokens exactly
    in_block_order = visual.merger(block_out[0])
    merged = torch.cat([t.hidden[0] for t in handed])
    order = torch.cdist(merged, in_block_order).argmin(dim=1)
    assert torch.equal(in_block_order[order], merged)
    if full:
        assert not torch.equal(order, torch.arange(len(order))), "Qwen2.5-VL reorders the groups by window"
    start = 0
    for tokens in handed:
        n = tokens.hidden.shape[1]
        rows = order[start : start + n]
        torch.testing.assert_close(tokens.received_attention[0], received[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens.keys[0], keys[rows], atol=1e-6, rtol=1e-5)
        assert tokens.layout.grid[0] * tokens.layout.grid[1] == n and tokens.layout.num_prefix == 0
        start += n
    assert start == merged.shape[0]


@pytest.mark.parametrize("name", [n for n, arch in QWEN_ARCHS.items() if arch.spec.version in ("2", "2.5")])
def test_real_architectures_have_the_7b_shapes(name):
    cfg = replace(QWEN_ARCHS[name].spec, text_layers=2)  # reduced text depth, the rest as released
    config = qwen_config(cfg, build_tokenizer(cfg.words))
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (2, 3584, 28)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (4, 18944, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.num_heads, vision.patch_size, vision.spatial_merge_size) == (32, 16, 14, 2)
    if cfg.version == "2.5":
        assert (vision.hidden_size, vision.intermediate_size, vision.out_hidden_size) == (1280, 3420, 3584)
        assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31] and vision.window_size == 112
    else:
        assert (vision.embed_dim, vision.hidden_size, vision.mlp_ratio) == (1280, 3584, 4)


def test_new_images_on_a_filled_cache_are_refused(model, processor, batch):
    _, images, texts = batch
    first = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    second = processor(images=[images[1]], text=[texts[1]], return_tensors="pt")
    vlmzip.compress(model, "visionzip", tokens=8)
    with torch.no_grad():
        cache = model(**first, use_cache=True).cache
        ids = second["input_ids"]
        mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
        with pytest.raises(ValueError, match="images in the first call on a cache only"):
            model(input_ids=ids, attention_mask=mask, cache=cache, mm_token_type_ids=second["mm_token_type_ids"],
                  pixel_values=second["pixel_values"], image_grid_thw=second["image_grid_thw"])


def test_a_checkpoint_keeps_its_own_chat_template_when_autoprocessor_cannot_be_built(tmp_path):
    """Without torchvision transformers cannot build Qwen's processor; the image-only one vlmzip builds instead
    carries the checkpoint's own template (its system prompt included), never another one."""
    build_qwen_vl(tmp_path, QwenVLSpec())
    own = ("{% for message in messages %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
           "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}{% if part['type'] == 'image' %}"
           "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "chat_template.jinja").write_text(own)
    processor = load_processor(tmp_path)
    assert processor.chat_template == own
    assert "You are a helpful assistant." in prompt(processor, "what is it ?")
    (tmp_path / "chat_template.jinja").unlink()
    try:
        AutoProcessor.from_pretrained(tmp_path)
    except Exception:  # the image-only fallback is what runs here: without a template of its own, it refuses
        with pytest.raises(ValueError, match="has no chat template of its own"):
            load_processor(tmp_path)
    else:
        pytest.skip("transformers builds Qwen's own processor here (torchvision works): no fallback to check")


def test_qwen3_vl_8b_has_the_released_shapes():
    spec = replace(QWEN_ARCHS["qwen3-vl-8b"].spec, text_layers=2)
    model, _ = build_qwen_vl(spec=spec, device="meta")
    text, vision = model.config.text_config, model.config.vision_config
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4096, 32, 8, 128)
    assert (text.intermediate_size, text.vocab_size, text.rope_parameters["mrope_section"]) == (12288, 151936,
                                                                                                 [24, 20, 20])
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.patch_size) == (27, 1152, 16, 16)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24] and vision.num_position_embeddings == 48 * 48
    assert len(model.model.visual.deepstack_merger_list) == 3


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-qwen3")
    build_qwen_vl(out, QwenVLSpec(version="3", text_layers=3, deepstack_layers=(0, 1, 2)))
    return out


def test_qwen3_deepstack_features_follow_the_selection(qwen3_dir, batch):
    """The DeepStack features added to the first decoder layers are the vanilla ones, selected and merged as the
    method selected and merged the tokens (VisionZip merges its contextual tokens)."""
    inputs, _, _ = batch
    model = AutoModelForImageTextToText.from_pretrained(qwen3_dir).eval()
    with torch.no_grad():
        vanilla = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).deepstack_features
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["deepstack_visual_embeds"], masks=k["visual_pos_masks"]),
        with_kwargs=True)
    vlmzip.compress(model, "visionzip", tokens=10)
    with vlmzip.recorded(model) as selections, torch.no_grad():
        model(**inputs)
    hook.remove()
    sizes = vanilla_counts(inputs)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert len(seen["embeds"]) == 3 and int(seen["masks"].sum()) == 10 * len(sizes)
    for layer, feats in enumerate(vanilla):
        expected = torch.cat([
            sel.apply(feats[starts[i] : starts[i] + sizes[i]].unsqueeze(0))[0]
            for i, sel in enumerate(selections)  # one selection per image here: every grid differs
        ])
        torch.testing.assert_close(seen["embeds"][layer], expected, atol=1e-5, rtol=1e-5)


def test_qwen3_deepstack_additions_after_pruning_go_to_the_kept_visual_tokens():
    """Once an in-LLM method pruned, each kept visual slot gets its own token's addition; text, padding and
    inserted slots get none."""
    from vlmzip.adapters.qwen_vl import DeepstackAdditions

    class LM(torch.nn.Module):
        def _deepstack_process(self, hidden, masks, embeds):
            hidden = hidden.clone()
            hidden[masks] = hidden[masks] + embeds
            return hidden

    class Step:
        def current_slots(self):  # row 0 keeps input columns 0, 2, 3 (visual 2 and 3); row 1: 4, 1 (visual), pad
            return torch.tensor([[0, 2, 3], [4, 1, 0]]), torch.tensor([[True, True, True], [True, True, False]])

    class State:
        def current_step(self):
            return Step()

    masks = torch.tensor([[False, True, True, True, False], [False, True, False, True, False]])
    embeds = torch.arange(1.0, 6.0).unsqueeze(1)  # visual tokens in row-major order: (0,1) (0,2) (0,3) (1,1) (1,3)
    out = DeepstackAdditions(LM(), State())(torch.zeros(2, 3, 1), masks, embeds)
    assert out[..., 0].tolist() == [[0.0, 2.0, 3.0], [0.0, 4.0, 0.0]]


@pytest.mark.parametrize(("version", "layers", "in_llm"), [("3-moe", 3, True), ("3.5", 4, False)],
                         ids=["qwen3-vl-moe", "qwen3.5"])
def test_qwen3_moe_and_qwen3_5_share_the_qwen_path(tmp_path, version, layers, in_llm):
    """Qwen3-VL-MoE (expert MLPs) and Qwen3.5 (linear-attention layers, no DeepStack) take the same adapter:
    keep-all is exact, a budget shrinks every image, batch equals single runs; in-LLM methods work on the MoE and
    are refused, clearly, on Qwen3.5's recurrent layers."""
    build_qwen_vl(tmp_path, QwenVLSpec(version=version, text_layers=layers))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = load_processor(tmp_path)
    images = [random_image(i, size) for i, size in enumerate(SIZES[:2])]
    texts = [prompt(processor, q) for q in QUESTIONS[:2]]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    before = logits(model, inputs)
    with vlmzip.compressed(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    methods = [("visionzip", {"tokens": 6}), *([("fastv", {"layer": 1, "tokens": 6})] if in_llm else [])]
    for method, knobs in methods:
        with vlmzip.compressed(model, method, **knobs):
            batched = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            for i in range(2):
                single = processor(images=[images[i]], text=[texts[i]], return_tensors="pt")
                alone = model.generate(**single, max_new_tokens=3, min_new_tokens=3, do_sample=False)
                assert torch.equal(alone[0, -3:], batched[i, -3:]), (method, i)
    if not in_llm:
        with pytest.raises(ValueError, match="linear-attention .* use a pre-LLM method"):
            vlmzip.compress(model, "fastv", tokens=6)


@pytest.fixture(scope="module", params=["2", "3"], ids=["qwen2-vl", "qwen3-vl"])
def deep_qwen(request, tmp_path_factory):
    """A Qwen2-VL / Qwen3-VL (DeepStack into its first 3 layers) with 6 decoder layers, deep enough for every
    in-LLM method, its processor and a left-padded batch of three grids."""
    out = tmp_path_factory.mktemp(f"tiny-qwen{request.param}-6")
    build_qwen_vl(out, QwenVLSpec(version=request.param, text_layers=6, deepstack_layers=(0, 1, 2)))
    processor = load_processor(out)
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    texts = [prompt(processor, q) for q in QUESTIONS]
    return out, processor, (processor(images=images, text=texts, return_tensors="pt", padding=True), images, texts)


@pytest.mark.parametrize("method", sorted(name for name, spec in vlmzip.methods.registered().items()
                                          if spec.takes_budget))
def test_every_method_batch_equals_single_runs(deep_qwen, method):
    """Keep-all reproduces the vanilla logits; a budget of 8 per image gives each row of a padded batch of three
    grids the answer and first-step logits it gets alone (Qwen3-VL: the DeepStack features selected and, inside
    the LLM, pruned in step)."""
    folder, processor, (inputs, images, texts) = deep_qwen
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    before = logits(model, inputs)
    with vlmzip.compressed(model, method, ratio=1.0):
        torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=0)
    with vlmzip.compressed(model, method, tokens=8):
        batched = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        for i in range(len(images)):
            single = processor(images=[images[i]], text=[texts[i]], return_tensors="pt")
            alone = model.generate(**single, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
            assert torch.equal(alone.sequences[0, -3:], batched.sequences[i, -3:])
            torch.testing.assert_close(alone.logits[0][0], batched.logits[0][i], atol=1e-4, rtol=1e-4)


def test_eval_on_images_with_their_own_counts(tmp_path, capsys, qwen_dir):
    """vlmzip eval on a model whose images each have their own visual-token count: vanilla is 'per image', a
    token budget is every image's count, a ratio goes to its own group; the table and plot are written."""
    from vlmzip.cli import main
    from vlmzip.lab.scenes import write_split

    write_split("val", tmp_path / "data", n_images=2)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(qwen_dir[1]), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--methods", "vanilla,visionzip,fastv[layer=1],random[ratio=0.25]", "--tokens", "12", "--limit", "4",
                 "--max-new-tokens", "2", "--batch-size", "4"]) == 0
    table = (out / "table.md").read_text()
    assert "| vanilla | per image |" in table and "**Retain 12 tokens**" in table and "| visionzip | 12 |" in table
    assert "**Other budgets**" in table and "| random[ratio=0.25] | ratio 0.25 |" in table
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("version", ["3", "3-moe"])
def test_in_llm_attention_rows_are_the_eager_ones_with_q_k_norms(tmp_path, version, monkeypatch):
    """Qwen3 normalises q and k per head (q_norm / k_norm) before RoPE: the attention rows FastV (the previous
    layer's) and saliency (its own layer's logits) rebuild from the captured q / k equal eager attention."""
    build_qwen_vl(tmp_path, QwenVLSpec(text_layers=3), version=version)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    processor = load_processor(tmp_path)
    inputs = processor(images=[random_image(1, SIZES[1])], text=[prompt(processor, "how many ?")], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs, output_attentions=True).attentions
    for method, knobs, layer in (("fastv", {"layer": 2}, 1), ("saliency", {"tokens": 6}, 0)):
        vlmzip.compress(model, method, **knobs)
        step = vlmzip.api.state_of(model).steps[0]
        seen: list[torch.Tensor] = []

        def spy(tokens, original=step.fn, seen=seen, **kw):
            last = torch.full((1, 1), tokens.hidden.shape[1] - 1)
            rows = tokens.attention(last) if tokens.layer > 0 else torch.softmax(tokens.logits(last), dim=-1)
            seen.append(rows[0, :, 0])
            return original(tokens, **kw)

        monkeypatch.setattr(step, "fn", spy)
        logits(model, inputs)
        vlmzip.decompress(model)
        torch.testing.assert_close(seen[0], probs[layer][0, :, -1].float(), atol=1e-5, rtol=1e-4)
