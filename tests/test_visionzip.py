"""VisionZip: signals from SDPA hooks equal eager attention; tokens equal a plain reference; invariants."""

from __future__ import annotations

import torch
from conftest import load
from hypothesis import given, settings
from hypothesis import strategies as st

import vlmzip
from vlmzip.adapters import adapter_for
from vlmzip.budgets import split_budget
from vlmzip.methods.base import TokenLayout, VisionTokens
from vlmzip.methods.visionzip import visionzip, visionzip_select


def eager_reference(model, pixel_values):
    """Attention, hidden states and keys of the feature layer, straight from an eager-attention tower."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
    index = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
    layer = tower.encoder.layers[index - 1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[index - 1]))
    heads = model.config.vision_config.num_attention_heads
    keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)
    return out.attentions[index - 1], out.hidden_states[index], keys


def reference_visionzip(attn, hidden, keys, dominant, contextual):
    """A plain per-image loop over the paper's algorithm (CLS encoder)."""
    outputs = []
    for b in range(hidden.shape[0]):
        cls_row = attn[b, :, 0, 1:].sum(dim=0)
        top = sorted((cls_row.topk(dominant - 1).indices + 1).tolist())
        keep = [0, *top]
        rest = [i for i in range(hidden.shape[1]) if i not in keep]
        tokens = [hidden[b, i] for i in keep]
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        members = {t: [] for t in targets}
        normed = [keys[b, i] / keys[b, i].norm() for i in rest]
        for j in range(len(rest)):
            if j in targets:
                continue
            sims = torch.stack([normed[j] @ normed[t] for t in targets])
            members[targets[int(sims.argmax())]].append(hidden[b, rest[j]])
        for t in targets:
            extra = torch.stack(members[t]).mean(0) if members[t] else torch.zeros_like(hidden[b, 0])
            tokens.append(hidden[b, rest[t]] + extra)
        outputs.append(torch.stack(tokens))
    return torch.stack(outputs)


def test_scores_from_sdpa_hooks_equal_eager_attention(llava_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    sdpa = load(llava_dir)
    eager = load(llava_dir, attn_implementation="eager")
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
    with torch.no_grad():
        attn, hidden, keys = eager_reference(eager, inputs["pixel_values"])
        adapter = adapter_for(sdpa)
        tokens = adapter.tower.run(inputs["pixel_values"], adapter.layout, frozenset({"keys", "cls_attention"}))
    torch.testing.assert_close(tokens.cls_attention, attn[:, :, 0, :].sum(dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.keys, keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.hidden, hidden, atol=1e-5, rtol=0)


def test_visionzip_tokens_equal_plain_reference(llava_dir, batch_inputs):
    inputs, _, _ = batch_inputs
    model = load(llava_dir)
    eager = load(llava_dir, attn_implementation="eager")
    dominant, contextual = 12, 5
    with torch.no_grad():
        expected = reference_visionzip(*eager_reference(eager, inputs["pixel_values"]), dominant, contextual)
        with vlmzip.compressed(model, "visionzip", dominant=dominant, contextual=contextual), \
                vlmzip.recorded(model) as selections:
            got = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        selection = selections[-1]
    torch.testing.assert_close(selection.features, expected, atol=1e-5, rtol=1e-5)
    projected = model.model.multi_modal_projector(expected)
    torch.testing.assert_close(torch.stack(got), projected, atol=1e-5, rtol=1e-5)
    assert (selection.indices[:, 0] == 0).all(), "CLS is sent first"


def test_paper_splits():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)


def synthetic(batch, grid, dim, cls, seed):
    gen = torch.Generator().manual_seed(seed)
    total = grid * grid + int(cls)
    hidden = torch.randn(batch, total, dim, generator=gen)
    keys = torch.randn(batch, total, 8, generator=gen)
    scores = torch.rand(batch, total, generator=gen)
    layout = TokenLayout(num_prefix=int(cls), grid=(grid, grid), send_prefix=False)
    return VisionTokens(hidden=hidden, layout=layout, keys=keys,
                        cls_attention=scores if cls else None, received_attention=None if cls else scores)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    grid=st.integers(2, 7),
    cls=st.booleans(),
    data=st.data(),
)
def test_visionzip_invariants(batch, grid, cls, data):
    tokens = synthetic(batch, grid, 6, cls, seed=batch * 100 + grid)
    total = tokens.hidden.shape[1]
    dominant = data.draw(st.integers(1, total))
    contextual = data.draw(st.integers(0, total - dominant))
    sel = visionzip_select(tokens, dominant, contextual)
    assert sel.features.shape == (batch, dominant + contextual, 6)
    assert torch.isfinite(sel.features).all()
    for row in sel.indices:
        assert len(set(row.tolist())) == row.numel(), "indices unique"
        assert int(row.min()) >= 0 and int(row.max()) < total
    if cls:
        assert (sel.indices[:, 0] == 0).all()
    dom = sel.indices[:, :dominant]
    assert (dom[:, 1:] > dom[:, :-1]).all(), "dominant tokens in positional order"
    # every input token lands in exactly one output slot, or none when there are no contextual tokens
    if contextual:
        assert (sel.merged_from >= 0).all()
    else:
        assert int((sel.merged_from >= 0).sum()) == batch * dominant
    assert int(sel.merged_from.max()) < dominant + contextual


def test_keeping_every_token_returns_them_all():
    tokens = synthetic(2, 4, 5, True, seed=3)
    sel = visionzip_select(tokens, dominant=17, contextual=0)
    assert torch.equal(sel.features, tokens.hidden)


def test_budget_split_follows_the_papers_share():
    tokens = synthetic(1, 10, 4, True, seed=5)
    sel = visionzip(tokens, keep=64)
    assert sel.features.shape[1] == 64
    dominant = sel.indices[0, :54]
    assert dominant[0] == 0 and (dominant[1:] > dominant[:-1]).all(), "54 dominant tokens, CLS first, in order"
    assert set(sel.merged_from[0].tolist()) - set(range(54)) == set(range(54, 64)), "10 contextual slots"
