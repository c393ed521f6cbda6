"""The identity method: send exactly the tokens the unmodified model sends.

It runs through all of vlmzip's machinery (hooks, sequence handling, generate wrapper) while changing
nothing, so it must reproduce the vanilla model's logits bit for bit. Used as the no-op reference in
tests and as the ``vanilla`` row of evaluations.
"""

from __future__ import annotations

from .base import MethodSpec, Selection, VisionTokens, register


def keep_all(tokens: VisionTokens, keep: int) -> Selection:
    """(B, T, D) -> (B, T_v, D): the vanilla tokens (prefix dropped unless the model sends it)."""
    idx = tokens.vanilla_indices().expand(tokens.hidden.shape[0], -1)
    return Selection(features=tokens.hidden[:, idx[0]], indices=idx)


SPEC = register(
    MethodSpec(
        name="vanilla",
        description="No compression: every visual token the model normally sends (the reference).",
        knobs=(),
        fn=keep_all,
        resolve=lambda knobs: {},
        takes_budget=False,
    )
)
