"""Checks of text users pass in (prompts, questions), torch-free so that the command line can check its flags
before it loads anything."""

from __future__ import annotations


def check_utf8(text: str | None, what: str) -> None:
    """A clear ValueError for text given as bytes that are not UTF-8 (``--prompt $'\\xff'`` from a shell):
    Python keeps such bytes as lone surrogates, which no tokenizer accepts. ``what`` names the text in the
    message (``--prompt``, ``the prompt``)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ", ".join(f"0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"U+{ord(c):04X}"
                        for c in err.object[err.start : err.end])
        raise ValueError(f"{what} is not valid UTF-8 text ({bad} at character {err.start + 1}); pass the text "
                         "in UTF-8 (check the encoding of your terminal or script)") from None
