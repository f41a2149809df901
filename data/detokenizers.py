"""The reference's text clean-ups, applied to raw text before tokenisation.

Each detokeniser maps str -> str; `DETOKENIZERS` names them as `DatasetSpec.detokenizer` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

DETOKENIZER_VERSION = 1  # bump when a detokeniser changes (part of every cache name)


def wikitext_detokenizer(text: str) -> str:
    """Undo WikiText's tokenisation (spaces around punctuation, @-@ separators, ...)."""
    text = text.replace("s '", "s'")
    # The reference's pattern is a literal "/' D/" (slashes included) replaced by "/'[0-9]/".
    text = re.sub(r"/' [0-9]/", "/'[0-9]/", text)
    for sep in ("-", ",", "."):
        text = text.replace(f" @{sep}@ ", sep)
    for punct in (":", ";", ".", "!", "?", ","):
        text = text.replace(f" {punct} ", f"{punct} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    text = text.replace(" N ", " 1 ")
    return text.replace(" 's", "'s")


def ptb_detokenizer(text: str) -> str:
    """Undo the Penn Treebank's tokenisation; `N` (a number) becomes 1, `<unk>` becomes ?."""
    text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    text = text.replace(" \n ", "\n").replace("\\/", "/")
    for _ in range(10):  # overlapping matches (" N N ") need repeated passes, as the reference
        text = text.replace(" N ", " 1 ")
    return text.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lm1b_detokenizer(text: str) -> str:
    """Undo LM1B's tokenisation (URLs, clitics, punctuation, quotes and brackets, currency)."""
    text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
    text = re.sub(r" '(\w+)", r"'\1", text)
    text = re.sub(r" (\w+) \. ", r" \1. ", text)
    text = re.sub(r" (\w+) \.$", r" \1.", text)
    text = text.replace(" ? ", "? ")
    text = re.sub(r" \?$", "?", text)
    text = text.replace(" ! ", "! ")
    text = re.sub(r" !$", "!", text)
    for punct in (",", ":", ";"):
        text = text.replace(f" {punct} ", f"{punct} ")
    text = text.replace(" / ", "/")
    text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
    text = re.sub(r"' ([^']+) '", r"'\1'", text)
    text = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", text)
    text = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", text)
    return text.replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")


def lambada_detokenizer(text: str) -> str:
    """Curly double quotes to straight ones; the result is a newline + the stripped text."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
    text = text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


def scientific_papers_detokenizer(text: str) -> str:
    """The WikiText rules, then the LM1B rules."""
    return lm1b_detokenizer(wikitext_detokenizer(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
    "scientific_papers": scientific_papers_detokenizer,
}
