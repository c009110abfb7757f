"""Prompts as AUTOMATIC1111 reads them: attention weights, BREAK, prompts past 77 tokens.

`prompt_syntax="a1111"` reads a prompt as AUTOMATIC1111's web UI does (its prompt_parser's
attention syntax and its CLIP wrapper's chunking and "Original" emphasis):

- `(x)` multiplies the weight of x by 1.1, `((x))` by 1.21, `[x]` divides it by 1.1,
  `(x:w)` multiplies it by w; an unclosed bracket acts to the end of the prompt, a stray
  closing one is text; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves.
- The prompt's tokens go into chunks of 75 (77 with BOS and EOS, padded as the tokenizer
  pads); a chunk that fills up moves the words after its last comma to the next chunk when
  that comma is within the last 20 tokens; the word BREAK ends a chunk.
- Each chunk is encoded on its own; its hidden states are multiplied by their tokens'
  weights and rescaled to the chunk's mean before weighting; the chunks are concatenated
  along the sequence (77 * k tokens). Every text of a call (prompts and negatives) is padded
  to the same number of chunks with the empty prompt's chunk, so CFG stays one batch.

Two differences from the web UI, both where it gives surprising results: the mean is each
text's own (the web UI takes it over the batch of texts encoded together, which is the same
for one prompt), and BREAK inside brackets still ends a chunk (the web UI encodes it there as
the word "BREAK" with a negative weight). `prompt_syntax="plain"` is diffusers' reading:
literal text, truncated to 77 tokens with a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError

PLAIN, A1111 = "plain", "a1111"
SYNTAXES = (PLAIN, A1111)
CHUNK_TOKENS = 75  # a chunk's prompt tokens; with BOS and EOS, CLIP's 77
COMMA_BACKTRACK = 20  # a full chunk moves the words after a comma this close to its end to the next one
ROUND, SQUARE = 1.1, 1 / 1.1  # (x) and [x]
BREAK = None  # the weight of a BREAK in parse_attention's result

# one piece of the prompt: an escaped character, a bracket, ":w)" closing a weighted span, a
# closing bracket, text, or a lone ":" (the web UI's attention grammar)
_PIECE = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float | None]]:
    """The prompt as (text, weight) spans, runs of equal weight merged; a BREAK is the span
    ("", BREAK). An empty prompt is [("", 1.0)]. A weight that is not a number (`(x:1.2.3)`)
    is an InvalidArgumentError of `prompt`."""
    spans: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's span starts

    def scale(start: int, by: float) -> None:
        for span in spans[start:]:
            if span[1] is not BREAK:
                span[1] *= by

    for m in _PIECE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            spans.append([piece[1:], 1.0])
        elif piece in opened:
            opened[piece].append(len(spans))
        elif weight is not None and opened["("]:
            try:
                by = float(weight)
            except ValueError:
                raise InvalidArgumentError(f"the weight {weight!r} in {piece!r} is not a number", "prompt") from None
            scale(opened["("].pop(), by)
        elif piece == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif piece == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:  # text (a stray closing bracket or ":w)" too), split at each BREAK
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    spans.append(["", BREAK])
                spans.append([part, 1.0])
    for start in opened["("]:  # unclosed: to the end of the prompt
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[list] = []
    for span in spans or [["", 1.0]]:
        if merged and merged[-1][1] is not BREAK and span[1] is not BREAK and merged[-1][1] == span[1]:
            merged[-1][0] += span[0]
        else:
            merged.append(list(span))
    return [(t, w) for t, w in merged]


@dataclass(frozen=True)
class Vocab:
    """What chunking needs of a CLIP tokenizer."""

    bos: int
    eos: int
    pad: int
    comma: int | None

    @classmethod
    def of(cls, tokenizer) -> "Vocab":
        pad = tokenizer.pad_token_id
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id if pad is None else pad,
                   tokenizer.get_vocab().get(",</w>"))


@dataclass
class Chunk:
    """77 token ids (BOS, up to 75 prompt tokens, EOS, padding) and each token's weight."""

    ids: list[int]
    weights: list[float]


def _close(tokens: list[int], weights: list[float], vocab: Vocab) -> Chunk:
    """A chunk of up to 75 tokens as the encoder takes it: BOS + tokens + EOS, then padding
    (EOS where the tokenizer pads with EOS, its pad token after the first EOS otherwise)."""
    fill = CHUNK_TOKENS - len(tokens)
    ids = [vocab.bos, *tokens, vocab.eos] + [vocab.pad] * fill
    return Chunk(ids, [1.0, *weights, 1.0] + [1.0] * fill)


def empty_chunk(vocab: Vocab) -> Chunk:
    """The empty prompt's chunk: what shorter texts are padded with."""
    return _close([], [], vocab)


def chunk_prompt(text: str, tokenizer, vocab: Vocab | None = None, split=None) -> list[Chunk]:
    """The chunks of an A1111-syntax prompt (at least one). `split(ids)` gives a span's ids with
    textual-inversion words as tuples of their vector ids (fastsd/embeddings.py), which stay
    in one chunk, as the web UI keeps them."""
    vocab = vocab or Vocab.of(tokenizer)
    spans = parse_attention(text)
    texts = [t for t, w in spans if w is not BREAK]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
                     if texts else [])
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    comma = -1  # position in `tokens` of the chunk's last comma

    def close() -> None:
        nonlocal tokens, weights, comma
        chunks.append(_close(tokens, weights, vocab))
        tokens, weights, comma = [], [], -1

    for _, weight in spans:
        if weight is BREAK:
            close()
            continue
        ids = next(tokenized)
        for token in (split(ids) if split is not None else ids):
            if token == vocab.comma:
                comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and comma != -1 and len(tokens) - comma <= COMMA_BACKTRACK:
                moved, moved_weights = tokens[comma + 1:], weights[comma + 1:]
                tokens, weights = tokens[:comma + 1], weights[:comma + 1]
                close()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                close()
            if isinstance(token, tuple):  # an embedding's vectors
                if len(tokens) + len(token) > CHUNK_TOKENS:
                    close()
                tokens.extend(token)
                weights.extend([weight] * len(token))
                continue
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis, per chunk: hidden (N, 77, C) times each token's
    weight (N, 77), rescaled so each chunk keeps the mean it had (in float32)."""
    if bool((weights == 1).all()):
        return hidden
    z = hidden.float()
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z.device, torch.float32)[:, :, None]
    return (z * (before / z.mean(dim=(1, 2), keepdim=True))).to(hidden.dtype)


def encode_chunks(encoder, texts: list[list[Chunk]], device: torch.device, pad: Chunk, k: int | None = None):
    """Encode every text's chunks in one encoder call, each text padded with `pad` to `k`
    chunks (default: the most any has). Returns (N, 77 * k, C) and, for an encoder that also gives a pooled
    output, its (N, P) pooled output of each text's first chunk (as the web UI takes it),
    else None."""
    k = k or max(len(c) for c in texts)
    rows = [chunk for chunks in texts for chunk in chunks + [pad] * (k - len(chunks))]
    ids = torch.tensor([c.ids for c in rows], dtype=torch.int64, device=device)
    out = encoder(ids)
    hidden, pooled = out if isinstance(out, tuple) else (out, None)
    hidden = emphasize(hidden, torch.tensor([c.weights for c in rows]))
    n, length, width = len(texts), hidden.shape[1], hidden.shape[2]
    hidden = hidden.reshape(n, k * length, width)
    return hidden, (None if pooled is None else pooled.reshape(n, k, -1)[:, 0])


# ---- extra networks: <lora:NAME:W> ------------------------------------------------------------

_EXTRA = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tags
LORA_KINDS = ("lora", "lyco")  # lyco: the LyCORIS extension's spelling, the same LoRA files


def lora_tags(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """(the text without its extra-network tags, the (name, weight) of each <lora:NAME[:W]>
    in order; W defaults to 1). The tags are cut out as the web UI cuts them (the words around
    them stay as they are). Other extra networks (hypernetworks, ...) and separate text-encoder
    and UNet weights are InvalidArgumentErrors of `prompt`."""
    found = []
    for m in _EXTRA.finditer(text):
        kind, params = m.group(1), m.group(2).split(":")
        if kind not in LORA_KINDS:
            raise InvalidArgumentError(f"the tag {m.group(0)!r}: fastsd applies <lora:...> tags only, not {kind}",
                                       "prompt")
        name, weights = params[0].strip(), params[1:]
        if not name:
            raise InvalidArgumentError(f"the tag {m.group(0)!r} names no LoRA", "prompt")
        try:
            values = [float(w) for w in weights[:2]]
        except ValueError:
            raise InvalidArgumentError(f"the tag {m.group(0)!r}: its weight is not a number", "prompt") from None
        if len(values) == 2 and values[0] != values[1]:
            raise InvalidArgumentError(f"the tag {m.group(0)!r}: separate text-encoder and UNet weights are not "
                                       "supported (give one weight)", "prompt")
        found.append((name, values[0] if values else 1.0))
    return _EXTRA.sub("", text), tuple(found)
