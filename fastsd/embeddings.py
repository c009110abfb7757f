"""Textual inversion: learned token embeddings, usable as words in prompts.

`pipe.load_textual_inversion(path, token=None)` reads AUTOMATIC1111's embeddings
(`.safetensors` with `emb_params`; `.pt` with `string_to_param`, only with allow_pickle),
diffusers' (`learned_embeds.safetensors`: {token: vectors}) and SD-XL's pairs (`clip_l`,
`clip_g`: one set of vectors per text encoder). The token (default: the file's name, or the
token diffusers' file names) is then a word of prompts and negative prompts in both prompt
syntaxes; an embedding of n vectors stands for n tokens, as diffusers expands it.

How: as AUTOMATIC1111, the tokenizer is left as it is. A prompt is tokenized as usual and
where the token's own BPE ids appear, they are replaced by ids past the vocabulary (V, V+1,
... in load order, as diffusers numbers added tokens). The runtime looks every id up in the
token table (the checkpoint's rows, then the loaded vectors: `TextualInversions.table`) and
the text-encoder networks take those embeddings, eager and engines alike: an embedding needs
no rebuild and no refit, and unloading one gives the checkpoint's table back untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, InvalidArgumentError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
XL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass
class Embedding:
    token: str
    path: str
    vectors: dict[str, torch.Tensor]  # per text encoder: (n, D) float32
    ids: tuple[int, ...] = ()  # the ids past the vocabulary its vectors have (set when the table is built)
    words: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per text encoder: the token's BPE ids

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def read_embedding(path, token: str | None, allow_pickle: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, vectors per text-encoder key: "text_encoder" or clip_l/clip_g) of an embedding file."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no textual inversion file {path}")
    suffix = file.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        elif suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise InvalidArgumentError(f"{file.name} is a pickle file, which can run code when loaded: convert it "
                                           "to .safetensors, or pass allow_pickle=True if you trust it")
            state = torch.load(str(file), map_location="cpu", weights_only=False)
        else:
            raise InvalidArgumentError(f"{file.name}: a textual inversion is a .safetensors file (or .pt / .bin with "
                                       "allow_pickle=True)")
    except (InvalidArgumentError, CheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise CheckpointError(f"cannot read the textual inversion {file}: {e}") from None
    if isinstance(state, torch.Tensor):
        state = {"": state}
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{file.name}: not a textual inversion (no embedding in it)")
    if "string_to_param" in state:  # AUTOMATIC1111's .pt
        vectors = {"text_encoder": state["string_to_param"].get("*")}
        default = state.get("name") or file.stem
    elif set(state) >= set(XL_KEYS):  # SD-XL: one set per text encoder
        vectors, default = {XL_KEYS[k]: state[k] for k in XL_KEYS}, file.stem
    elif "emb_params" in state:  # AUTOMATIC1111's .safetensors
        vectors, default = {"text_encoder": state["emb_params"]}, file.stem
    elif len(state) == 1:  # diffusers' learned_embeds: {token: vectors}
        (key, value), = state.items()
        vectors, default = {"text_encoder": value}, key or file.stem
    else:
        raise CheckpointError(f"{file.name}: not a textual inversion file this knows (keys: "
                              f"{', '.join(sorted(state)[:5])})")
    out = {}
    for key, v in vectors.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim not in (1, 2) or v.numel() == 0:
            raise CheckpointError(f"{file.name}: its embedding is not a float tensor of vectors")
        out[key] = (v[None] if v.ndim == 1 else v).detach().float()
    if len({v.shape[0] for v in out.values()}) != 1:
        raise CheckpointError(f"{file.name}: clip_l and clip_g have different numbers of vectors")
    token = default if token is None else token
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise InvalidArgumentError(f"a textual inversion token must be a non-empty word, got {token!r}")
    return token, out


class TextualInversions:
    """The loaded embeddings of one pipeline, in load order: their words in each tokenizer, the
    ids their vectors have, and the token tables with their vectors after the checkpoint's."""

    def __init__(self):
        self.loaded: dict[str, Embedding] = {}
        self._tables: dict[str, tuple] = {}  # per text encoder: (key, table) of the last table built

    def __bool__(self) -> bool:
        return bool(self.loaded)

    def check(self, token: str, vectors: dict[str, torch.Tensor], widths: dict[str, int], path) -> None:
        """A new embedding fits this model: one set of vectors per text encoder, each as wide
        as that encoder's token embeddings, and a token not loaded yet."""
        if token in self.loaded:
            raise InvalidArgumentError(f"a textual inversion with the token {token!r} is loaded already: unload it "
                                       "first, or pass another token")
        name = Path(path).name
        if set(vectors) != set(widths):
            if set(widths) == {"text_encoder"}:
                raise InvalidArgumentError(f"{name} is an SD-XL embedding (clip_l and clip_g); this checkpoint is "
                                           "SD 1.x/2.x")
            raise InvalidArgumentError(f"{name} has vectors for one text encoder; this SD-XL checkpoint needs an "
                                       "SD-XL embedding (clip_l and clip_g)")
        for network, v in vectors.items():
            if v.shape[1] != widths[network]:
                raise InvalidArgumentError(f"{name}: its vectors are {v.shape[1]} wide; this checkpoint's "
                                           f"{network} takes {widths[network]} (an embedding for another model)")

    def add(self, embedding: Embedding, tokenizers: dict, vocab: int) -> None:
        for network, tok in tokenizers.items():
            embedding.words[network] = tuple(tok(embedding.token, add_special_tokens=False).input_ids)
        self.loaded[embedding.token] = embedding
        self._number(vocab)

    def remove(self, tokens, vocab: int) -> list[str]:
        names = list(self.loaded) if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
        missing = [t for t in names if t not in self.loaded]
        if missing:
            raise InvalidArgumentError(f"no textual inversion with the token {missing[0]!r} is loaded "
                                       f"(loaded: {', '.join(self.loaded) or 'none'})")
        for t in names:
            del self.loaded[t]
        self._number(vocab)
        return names

    def _number(self, vocab: int) -> None:
        """The vectors' ids: V, V+1, ... in load order (as diffusers numbers added tokens)."""
        start = vocab
        for e in self.loaded.values():
            e.ids = tuple(range(start, start + e.count))
            start += e.count
        self._tables.clear()

    def table(self, network: str, base: torch.Tensor) -> torch.Tensor:
        """The token table of `network`: the checkpoint's rows `base` (V, D), then every loaded
        embedding's vectors, in base's dtype and on its device (built once per change)."""
        if not self.loaded:
            return base
        key = (base.data_ptr(), base.device, base.dtype, tuple(self.loaded))
        kept = self._tables.get(network)
        if kept is not None and kept[0] == key:
            return kept[1]
        rows = torch.cat([e.vectors[network] for e in self.loaded.values()]).to(base.device, base.dtype)
        table = torch.cat([base.detach(), rows])
        self._tables[network] = (key, table)
        return table

    def split(self, ids: list[int], network: str) -> list[int | tuple[int, ...]]:
        """A text's token ids with each loaded token's BPE ids replaced by a tuple of its vector
        ids (the longest match first, as the web UI finds embeddings)."""
        if not self.loaded:
            return list(ids)
        words = sorted(((e.words[network], e.ids) for e in self.loaded.values() if e.words.get(network)),
                       key=lambda w: -len(w[0]))
        out: list[int | tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            for word, vector_ids in words:
                if tuple(ids[i:i + len(word)]) == word:
                    out.append(vector_ids)
                    i += len(word)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out


def flatten(items: list[int | tuple[int, ...]]) -> list[int]:
    return [t for item in items for t in (item if isinstance(item, tuple) else (item,))]


class EmbeddingMethods:
    """Pipeline's textual-inversion methods (a mixin of fastsd/pipeline.py's Pipeline)."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, *, allow_pickle: bool = False,
                               **unsupported):
        """Load a textual inversion embedding (or a list of them, with a token each or None):
        its token (default: the file's name; diffusers' files: their token) becomes a word of
        prompts and negative prompts, an n-vector embedding standing for n tokens, as diffusers'
        load_textual_inversion. SD-XL takes files with clip_l and clip_g vectors. Pickle files
        (.pt, .bin) only with allow_pickle=True. Returns the token (a list for a list)."""
        if unsupported:
            raise InvalidArgumentError(f"load_textual_inversion takes no {sorted(unsupported)[0]!r} (fastsd loads "
                                       "into the pipeline's own tokenizers and text encoders)")
        if isinstance(pretrained_model_name_or_path, (list, tuple)):
            tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(pretrained_model_name_or_path)
            if len(tokens) != len(pretrained_model_name_or_path):
                raise InvalidArgumentError(f"{len(tokens)} tokens for {len(pretrained_model_name_or_path)} files")
            return [self.load_textual_inversion(p, t, allow_pickle=allow_pickle)
                    for p, t in zip(pretrained_model_name_or_path, tokens, strict=True)]
        path = pretrained_model_name_or_path
        token, vectors = read_embedding(path, token, allow_pickle)
        tables = self.family.token_tables
        with self._weights_lock.exclusive("load_textual_inversion"):
            self.family.embeddings.check(token, vectors, {n: t.embedding_dim for n, t in tables.items()}, path)
            tokenizers = {n: t for n, t in self.family.tokenizers.items() if t is not None}
            self.family.embeddings.add(Embedding(token, str(path), vectors), tokenizers,
                                       tables["text_encoder"].num_embeddings)
        log.info("textual inversion %r: %d vector(s) from %s", token, next(iter(vectors.values())).shape[0],
                 Path(path).name)
        return token

    def unload_textual_inversion(self, tokens=None, **unsupported) -> None:
        """Unload the embeddings of `tokens` (a token or a list; None: all): the text encoders
        get their own token tables back, bit for bit."""
        if unsupported:
            raise InvalidArgumentError(f"unload_textual_inversion takes no {sorted(unsupported)[0]!r}")
        with self._weights_lock.exclusive("unload_textual_inversion"):
            self.family.embeddings.remove(tokens, self.family.token_tables["text_encoder"].num_embeddings)

    @property
    def textual_inversions(self) -> list[dict]:
        """The loaded embeddings in load order: token, path, vectors."""
        return [{"token": e.token, "path": e.path, "vectors": e.count} for e in self.family.embeddings.loaded.values()]
