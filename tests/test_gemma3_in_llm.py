"""In-LLM methods on Gemma 3's decoder (sliding-window layers beside global ones, image tokens attending to each
other both ways), on a tiny random model whose window is shorter than its prompts: keep-all is exact, a pruned
prefill and its cached decode equal an explicit reference that runs the model's own layers on the kept tokens with
the window counted over the kept sequence, batches equal single runs, a second turn continues the pruned cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.builders.gemma3 import Gemma3Spec, build_gemma3
from vlmzip.methods import registered
from vlmzip.methods.base import LLMSelection

# six decoder layers: sliding, sliding, global, sliding, sliding, global; a window of 16 tokens, shorter than every
# prompt here (a picture is 36 tokens) and than the kept sequences after pruning
SPEC = Gemma3Spec(text_layers=6, sliding_window=16, sliding_window_pattern=3)
WINDOW = 16
IN_LLM = sorted(name for name, spec in registered().items() if spec.stage == "llm")
# (width, height): 800 x 300 -> the image and 3 crops (4 runs of 36), 130 x 120 -> 1 run, 300 x 600 -> 3 runs
SIZES = [(800, 300), (130, 120), (300, 600)]
QUESTIONS = ["what color is the shape ?", "how many ?", "is there a red circle left of the square ?"]
NEW = 4


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gemma3-sliding")
    build_gemma3(out, SPEC)
    return out


@pytest.fixture(scope="module")
def loaded(gemma_dir):
    return AutoModelForImageTextToText.from_pretrained(gemma_dir).eval()


@pytest.fixture()
def model(loaded):
    """The module's model, decompressed again after each test."""
    yield loaded
    if vlmzip.is_compressed(loaded):
        vlmzip.decompress(loaded)


@pytest.fixture(scope="module")
def processor(gemma_dir, loaded):
    return adapter_for(loaded).load_processor(gemma_dir)


def prompt(processor, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor, images, questions):
    return processor(images=[[image] for image in images], text=[prompt(processor, q) for q in questions],
                     return_tensors="pt", padding=True, do_pan_and_scan=True)


@pytest.fixture(scope="module")
def batch(processor):
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    return encode(processor, images, QUESTIONS), images


def knobs_for(method: str) -> dict:
    return {"ratio": 0.25, "layer": 1} if method == "fastv" else {"ratio": 0.25}


def block_ids(token_types: torch.Tensor) -> torch.Tensor:
    """(L,) token types -> (L,) index of the image run each image token belongs to, -1 for text."""
    out = torch.full_like(token_types, -1)
    run, previous = -1, 0
    for i, t in enumerate(token_types.tolist()):
        if t == 1 and previous != 1:
            run += 1
        if t == 1:
            out[i] = run
        previous = t
    return out


def reference_logits(vanilla, ids, token_types, pixel_values, kept: torch.Tensor, layer: int,
                     renumber: bool) -> torch.Tensor:
    """(N, V) logits of one unpadded row whose decoder layers from ``layer`` on see only the tokens ``kept`` (N
    increasing indices into ``ids``), written out: the vanilla model's input to ``layer`` at the kept tokens, then
    its own layers with masks built here (causal; an image run's tokens attend to each other both ways; a sliding
    layer only to keys fewer than the window before the query in the kept sequence), each layer type's own rotary
    embeddings of the kept tokens' positions (their own, or renumbered 0..N-1)."""
    lm = vanilla.model.language_model
    entering: list[torch.Tensor] = []
    handle = lm.layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            vanilla(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=token_types,
                    pixel_values=pixel_values)
    finally:
        handle.remove()
    hidden = entering[0][:, kept]
    n = kept.numel()
    positions = (torch.arange(n) if renumber else kept).unsqueeze(0)
    blocks = block_ids(token_types[0])[kept]
    slot = torch.arange(n)
    causal = slot.view(1, -1) <= slot.view(-1, 1)
    both_ways = (blocks.view(-1, 1) == blocks.view(1, -1)) & (blocks.view(-1, 1) >= 0)
    masks = {"full_attention": causal | both_ways}
    masks["sliding_attention"] = masks["full_attention"] & (slot.view(1, -1) > slot.view(-1, 1) - WINDOW)
    with torch.no_grad():
        for i in range(layer, len(lm.layers)):
            kind = lm.config.layer_types[i]
            out = lm.layers[i](hidden, position_embeddings=lm.rotary_emb(hidden, positions, kind),
                               attention_mask=masks[kind].view(1, 1, n, n), position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = vanilla.lm_head(lm.norm(hidden))[0]
    cap = vanilla.config.get_text_config().final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def spy_on_first_step(model, monkeypatch) -> list[torch.Tensor]:
    """The keep masks (B, L) the compressed model's first in-LLM step returns, one per call that prunes."""
    step = vlmzip.api.state_of(model).steps[0]
    seen: list[torch.Tensor] = []

    def spy(tokens, original=step.fn, **kw):
        out = original(tokens, **kw)
        seen.append((out.keep if isinstance(out, LLMSelection) else out).clone())
        return out

    monkeypatch.setattr(step, "fn", spy)
    return seen


def test_the_reference_keeping_every_token_is_the_vanilla_model(model, processor, batch):
    _, images = batch
    inputs = encode(processor, images[:1], QUESTIONS[:1])
    assert inputs["input_ids"].shape[1] > 3 * WINDOW, "the window is shorter than the prompt"
    with torch.no_grad():
        vanilla = model(**inputs).logits[0]
    every = torch.arange(inputs["input_ids"].shape[1])
    for layer in (0, 2, 4):
        ref = reference_logits(model, inputs["input_ids"], inputs["token_type_ids"], inputs["pixel_values"],
                               every, layer, renumber=False)
        torch.testing.assert_close(ref, vanilla, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", IN_LLM)
def test_keep_all_reproduces_vanilla_logits_on_a_padded_batch(model, batch, method):
    inputs, _ = batch
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch is left padded"
    with torch.no_grad():
        vanilla = model(**inputs).logits
    with vlmzip.compressed(model, method, ratio=1.0), torch.no_grad():
        kept = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(kept[real], vanilla[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "knobs", "layer", "renumber"), [
    ("fastv", {"ratio": 0.25, "layer": 1}, 1, False),  # before a sliding layer, positions kept
    ("fastv", {"ratio": 0.25, "layer": 2}, 2, False),  # before a global layer
    ("saliency", {"ratio": 0.25}, 0, True),  # before layer 0, positions renumbered (1-D RoPE)
])
def test_pruned_prefill_and_cached_decode_equal_the_reference(model, processor, batch, monkeypatch, method, knobs,
                                                              layer, renumber):
    """Every generated token's logits (the prefill's, then each decode step's on the pruned, window-truncated
    cache) equal the reference run on the kept prompt tokens followed by the generated ones."""
    _, images = batch
    inputs = encode(processor, images[:1], QUESTIONS[:1])
    prompt_len = inputs["input_ids"].shape[1]
    vlmzip.compress(model, method, **knobs)
    seen = spy_on_first_step(model, monkeypatch)
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert len(seen) == 1, "one pruning prefill, then decode steps on the cache"
    kept_prompt = seen[0][0].nonzero().flatten()
    assert WINDOW < kept_prompt.numel() < prompt_len
    ids = out.sequences[:, :-1]  # the prompt and every generated token but the last
    kept = torch.cat([kept_prompt, torch.arange(prompt_len, ids.shape[1])])
    token_types = torch.cat([inputs["token_type_ids"], torch.zeros(1, NEW - 1, dtype=torch.long)], dim=1)
    vlmzip.decompress(model)
    ref = reference_logits(model, ids, token_types, inputs["pixel_values"], kept, layer, renumber)
    rows = ref[kept_prompt.numel() - 1:]
    for i in range(NEW):
        torch.testing.assert_close(out.logits[i][0], rows[i], atol=1e-4, rtol=1e-4)
    # the cache: sliding layers from the pruned one on hold the last window - 1 kept slots, global ones every kept slot
    kinds = model.config.text_config.layer_types
    for i, cache_layer in enumerate(out.cache.layers):
        held = cache_layer.keys.shape[-2]
        if i < layer:
            assert held == (WINDOW - 1 if kinds[i] == "sliding_attention" else ids.shape[1])
        else:
            assert held == (WINDOW - 1 if kinds[i] == "sliding_attention" else kept.numel())


@pytest.mark.parametrize("method", IN_LLM)
def test_padded_batch_equals_single_runs(model, processor, batch, method):
    inputs, images = batch
    vlmzip.compress(model, method, **knobs_for(method))
    batched = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    for i, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        single_inputs = encode(processor, [image], [question])
        single = model.generate(**single_inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
        steps = len(single.logits)  # fewer than NEW when the row ends with <eos>
        start = inputs["input_ids"].shape[1]
        assert torch.equal(single.sequences[0, -steps:], batched.sequences[i, start:start + steps])
        for step in range(steps):
            torch.testing.assert_close(single.logits[step][0], batched.logits[step][i], atol=1e-4, rtol=1e-4)


def test_second_turn_continues_the_pruned_cache(model, processor, batch, monkeypatch):
    """A second user turn on the cache FastV pruned: its answer's logits equal the reference on the first turn's
    kept prompt tokens followed by everything after the prompt."""
    _, images = batch
    first = encode(processor, images[:1], QUESTIONS[:1])
    prompt_len = first["input_ids"].shape[1]
    vlmzip.compress(model, "fastv", ratio=0.25, layer=1)
    seen = spy_on_first_step(model, monkeypatch)
    turn1 = model.generate(**first, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    follow = processor.tokenizer("<end_of_turn>\n<start_of_turn>user\nhow many ?<end_of_turn>\n<start_of_turn>model\n",
                                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([turn1.sequences, follow], dim=1)
    turn2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=turn1.cache,
                           max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert len(seen) == 1, "the second turn runs on the pruned cache, it does not prune again"
    kept_prompt = seen[0][0].nonzero().flatten()
    every = turn2.sequences[:, :-1]
    kept = torch.cat([kept_prompt, torch.arange(prompt_len, every.shape[1])])
    token_types = torch.cat([first["token_type_ids"],
                             torch.zeros(1, every.shape[1] - prompt_len, dtype=torch.long)], dim=1)
    vlmzip.decompress(model)
    ref = reference_logits(model, every, token_types, first["pixel_values"], kept, 1, renumber=False)
    rows = ref[kept.numel() - NEW:]
    for i in range(NEW):
        torch.testing.assert_close(turn2.logits[i][0], rows[i], atol=1e-4, rtol=1e-4)


def test_new_images_on_a_cache_pruned_inside_the_llm_are_refused(model, processor, batch):
    _, images = batch
    first = encode(processor, images[:1], QUESTIONS[:1])
    second = encode(processor, images[1:2], QUESTIONS[1:2])
    vlmzip.compress(model, "fastv", ratio=0.25, layer=1)
    with torch.no_grad():
        cache = model(**first, use_cache=True).cache
        ids = second["input_ids"]
        mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
        with pytest.raises(ValueError, match="pruned inside an LLM with sliding-window layers"):
            model(input_ids=ids, attention_mask=mask, cache=cache, token_type_ids=second["token_type_ids"],
                  pixel_values=second["pixel_values"])
