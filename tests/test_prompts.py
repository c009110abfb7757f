"""Prompts as AUTOMATIC1111 reads them (prompt_syntax="a1111", fastsd/prompts.py): the parser
against the web UI's documented examples, the chunking rules, and whole images against
diffusers given the embeddings the web UI's algorithm makes, built here on their own from the
checkpoint's text encoders (not through fastsd's code path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsd import Pipeline
from fastsd.errors import InvalidArgumentError
from fastsd.prompts import BREAK, Vocab, chunk_prompt, parse_attention
from fastsd.synthetic import build

TOL = 1e-3


# ---- the parser: AUTOMATIC1111's documented examples (modules/prompt_parser.py) ------------

@pytest.mark.parametrize("text, want", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("((masterpiece)), [blurry]", [("masterpiece", 1.1 ** 2), (", ", 1.0), ("blurry", 1 / 1.1)]),
    ("a (red fox running:1.3) here", [("a ", 1.0), ("red fox running", 1.3), (" here", 1.0)]),
    (r"\\ a \[b\] \(c\)", [("\\ a [b] (c)", 1.0)]),
    ("stray) close] and :colon", [("stray) close] and :colon", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),  # ":w)" without an open "(" is text
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("", BREAK), ("b", 1.0)]),
    ("(a BREAK b:1.5)", [("a", 1.5), ("", BREAK), ("b", 1.5)]),  # the web UI: the word BREAK, weight -1.5
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention_as_the_web_ui(text, want):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g is BREAK if w is BREAK else g == pytest.approx(w, rel=1e-12)


def test_a_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(InvalidArgumentError, match="not a number") as e:
        parse_attention("a (fox:1.2.3) b")
    assert e.value.param == "prompt"


# ---- chunks ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tiny tokenizers: SD 1.x-like (pads with EOS) and SD 2.x / SD-XL second (pads with "!")."""
    path = build(tmp_path_factory.mktemp("xl") / "xl", "tiny-xl", seed=7)
    from transformers import CLIPTokenizer

    return path, CLIPTokenizer.from_pretrained(str(path / "tokenizer")), CLIPTokenizer.from_pretrained(
        str(path / "tokenizer_2"))


def _words(tok, text):
    return tok(text, add_special_tokens=False, verbose=False).input_ids


def test_chunks_pad_and_break_as_the_web_ui(tokenizers):
    _, tok, tok2 = tokenizers
    v, v2 = Vocab.of(tok), Vocab.of(tok2)
    assert v.pad == v.eos and v2.pad != v2.eos  # the two kinds of CLIP padding
    (one,) = chunk_prompt("a fox", tok)
    words = _words(tok, "a fox")
    assert one.ids == [v.bos, *words, v.eos] + [v.eos] * (75 - len(words)) and len(one.ids) == 77
    (two,) = chunk_prompt("a fox", tok2)
    assert two.ids == [v2.bos, *words, v2.eos] + [v2.pad] * (75 - len(words))  # pad after the first EOS
    (empty,) = chunk_prompt("", tok)
    assert empty.ids == [v.bos] + [v.eos] * 76 and empty.weights == [1.0] * 77
    first, second = chunk_prompt("a fox BREAK (snow:1.5)", tok)
    assert first.ids[1:1 + len(words)] == words and first.ids[1 + len(words)] == v.eos
    snow = _words(tok, "snow")
    assert second.ids[1:1 + len(snow)] == snow and second.weights[1:1 + len(snow)] == [1.5] * len(snow)
    assert len(chunk_prompt("a fox BREAK", tok)) == 1  # nothing after BREAK: no empty chunk


def test_a_full_chunk_moves_the_words_after_its_last_comma(tokenizers):
    _, tok, _ = tokenizers
    v = Vocab.of(tok)
    # the tiny tokenizer has no merges: a token per character (a word's last with "</w>")
    near = "x" * 60 + ", " + "y" * 30  # comma at token 60: 14 tokens before the end, within 20
    first, second = chunk_prompt(near, tok)
    assert first.ids[61] == v.comma and first.ids[62] == v.eos  # the chunk ends after the comma
    assert second.ids[1:31] == _words(tok, "y" * 30)
    far = "x" * 40 + ", " + "y" * 60  # comma at 40: 34 tokens before the end, too far
    first, second = chunk_prompt(far, tok)
    assert first.ids[1:76] == _words(tok, far)[:75] and second.ids[1:27] == _words(tok, far)[75:]
    assert len(chunk_prompt("z" * 75, tok)) == 1 and len(chunk_prompt("z" * 76, tok)) == 2


# ---- the reference: the web UI's algorithm, built here from the text encoders --------------

def _ref_chunks(tok, spans):
    """(ids, weights) per chunk of 77, from explicit (text, weight) spans; a None weight is BREAK."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id
    comma = tok.get_vocab()[",</w>"]
    out, cur, ws, last = [], [], [], -1

    def flush():
        nonlocal cur, ws, last
        n = 75 - len(cur)
        ids = [bos] + cur + [eos] + [eos] * n
        first_eos = ids.index(eos)
        ids = ids[:first_eos + 1] + [pad] * (76 - first_eos)
        out.append((ids, [1.0] + ws + [1.0] + [1.0] * n))
        cur, ws, last = [], [], -1

    for text, w in spans:
        if w is None:
            flush()
            continue
        for t in tok(text, add_special_tokens=False, verbose=False).input_ids:
            if t == comma:
                last = len(cur)
            elif len(cur) == 75 and last != -1 and 75 - last <= 20:
                keep, kw_ = cur[last + 1:], ws[last + 1:]
                cur, ws = cur[:last + 1], ws[:last + 1]
                flush()
                cur, ws = keep, kw_
            if len(cur) == 75:
                flush()
            cur.append(t)
            ws.append(w)
    if cur or not out:
        flush()
    return out


def _ref_embed(encoder, chunks, layer, final_norm, k):
    """One text's embeddings: each chunk through the encoder alone, weighted, mean restored,
    padded to k chunks with the empty prompt's chunk (passed as chunks' own pad); and the
    pooled output of its first chunk (None for an encoder without one)."""
    zs, pooled = [], None
    for i, (ids, weights) in enumerate(chunks[:k]):
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[layer]
        if final_norm is not None:
            z = final_norm(z)
        if i == 0 and hasattr(out, "text_embeds"):
            pooled = out.text_embeds
        w = torch.tensor(weights)[None, :, None]
        mean = z.mean()
        z = z * w
        zs.append(z * (mean / z.mean()))
    return torch.cat(zs, dim=1), pooled


def _padded(chunks, tok, k):
    return chunks + _ref_chunks(tok, [("", 1.0)]) * (k - len(chunks))


LONG_TEXT = "a (red:2.5) fox in the snow, [[blurry]], " + "x" * 40 + ", mountains and a lake BREAK ((sunset))"
LONG = [("a ", 1.0), ("red", 2.5), (" fox in the snow, ", 1.0), ("blurry", 1 / 1.1 ** 2),
        (", " + "x" * 40 + ", mountains and a lake", 1.0), ("", None), ("", 1.0), ("sunset", 1.1 ** 2)]
NEG = [("ugly", 2.0), (", bad", 1.0)]
NEG_TEXT = "(ugly:2.0), bad"


def test_the_long_prompts_parse_to_the_reference_spans():
    for text, spans in ((LONG_TEXT, LONG), (NEG_TEXT, NEG)):
        got = parse_attention(text)
        assert [t for t, _ in got] == [t for t, _ in spans]
        assert [w is None for _, w in got] == [w is None for _, w in spans]
        assert [w for _, w in got if w is not None] == pytest.approx([w for _, w in spans if w is not None])


def test_weighted_long_prompt_matches_diffusers_given_the_web_uis_embeddings(ckpts):
    """SD 1.x, clip_skip 1: a 3-chunk weighted prompt (comma backtrack, BREAK) and a 1-chunk
    weighted negative; fastsd against StableDiffusionPipeline given the reference embeddings."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    tok, enc = ref.tokenizer, ref.text_encoder
    norm = getattr(enc, "text_model", enc).final_layer_norm
    pos, neg = _ref_chunks(tok, LONG), _ref_chunks(tok, NEG)
    k = max(len(pos), len(neg))
    assert len(pos) == 3 and len(neg) == 1
    pos_emb, _ = _ref_embed(enc, _padded(pos, tok, k), -2, norm, k)
    neg_emb, _ = _ref_embed(enc, _padded(neg, tok, k), -2, norm, k)
    assert pos_emb.shape[1] == 231
    kw = dict(num_inference_steps=3, output_type="np", guidance_scale=7.5)
    want = ref(prompt_embeds=pos_emb, negative_prompt_embeds=neg_emb, generator=torch.Generator().manual_seed(3),
               **kw).images
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    got = pipe(LONG_TEXT, negative_prompt=NEG_TEXT, prompt_syntax="a1111", clip_skip=1, seed=3, **kw).images
    assert np.abs(got - want).max() <= TOL


def test_weighted_long_prompt_matches_diffusers_sdxl(tokenizers):
    """SD-XL, clip_skip 1: both encoders per chunk (layer -(clip_skip + 2), no final norm), pooled
    from the second encoder's first chunk; prompt 3 chunks, negative 1."""
    import diffusers

    path = tokenizers[0]
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(path))
    ref.set_progress_bar_config(disable=True)
    pairs = ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2))
    embs = {}
    for name, spans in (("pos", LONG), ("neg", NEG)):
        parts, pooled = [], None
        for tok, enc in pairs:
            chunks = _ref_chunks(tok, spans)
            z, p = _ref_embed(enc, _padded(chunks, tok, 3), -3, None, 3)
            parts.append(z)
            pooled = p if p is not None else pooled
        embs[name] = (torch.cat(parts, dim=-1), pooled)
    kw = dict(num_inference_steps=3, output_type="np", guidance_scale=5.0)
    want = ref(prompt_embeds=embs["pos"][0], pooled_prompt_embeds=embs["pos"][1],
               negative_prompt_embeds=embs["neg"][0], negative_pooled_prompt_embeds=embs["neg"][1],
               generator=torch.Generator().manual_seed(4), **kw).images
    pipe = Pipeline.from_pretrained(str(path), backend="eager", device="cpu")
    got = pipe(LONG_TEXT, negative_prompt=NEG_TEXT, prompt_syntax="a1111", clip_skip=1, seed=4, **kw).images
    assert np.abs(got - want).max() <= TOL


def test_plain_weights_and_long_prompts(ckpts):
    """(x:1.0) is x, bit for bit, and a short prompt reads the same in both syntaxes; a prompt
    past 77 tokens differs from its truncation (plain) and from its first chunk alone."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    kw = dict(num_inference_steps=2, seed=1, output_type="np")
    plain = pipe("a red fox", **kw).images
    assert np.array_equal(pipe("a (red:1.0) fox", prompt_syntax="a1111", **kw).images, plain)
    assert np.array_equal(pipe("a red fox", prompt_syntax="a1111", **kw).images, plain)
    assert not np.array_equal(pipe("a (red:1.3) fox", prompt_syntax="a1111", **kw).images, plain)
    long = "a red fox, " + "in the deep snow, " * 10
    assert len(pipe.family.tokenizer(long, verbose=False).input_ids) == 150
    truncated = pipe(long, **kw)
    whole = pipe(long, prompt_syntax="a1111", **kw)
    assert np.abs(whole.images - truncated.images).max() > 1e-3
    assert whole.settings["prompt_syntax"] == "a1111" and truncated.settings["prompt_syntax"] == "plain"


def test_prompt_syntax_is_checked(ckpts):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    with pytest.raises(InvalidArgumentError, match="plain, a1111") as e:
        pipe.check_call("a fox", prompt_syntax="comfy")
    assert e.value.param == "prompt_syntax"
    with pytest.raises(InvalidArgumentError, match="not a number"):
        pipe("a (fox:1..2)", prompt_syntax="a1111", num_inference_steps=1)


def test_cli_and_server_read_a1111_by_default(ckpts, tmp_path):
    """The CLI and the server default to the web UI's syntax (the API keeps diffusers'); the
    PNG records which one ran, and the server batches only requests that agree on it."""
    import json

    from PIL import Image

    from fastsd.cli import main
    from fastsd.serve import Limits
    from fastsd.serve.api import APIError, parse_request

    out = tmp_path / "a.png"
    base = ["generate", "a (red:1.4) fox", "--model", str(ckpts["eps"]), "--steps", "1", "--no-progress"]
    assert main([*base, "--out", str(out)]) == 0
    assert json.loads(Image.open(out).text["fastsd"])["prompt_syntax"] == "a1111"
    assert main([*base, "--out", str(tmp_path / "b.png"), "--prompt-syntax", "plain"]) == 0
    assert json.loads(Image.open(tmp_path / "b.png").text["fastsd"])["prompt_syntax"] == "plain"
    assert main([*base, "--out", str(tmp_path / "c.png"), "--prompt-syntax", "comfy"]) == 2

    def settings(**body):
        req = parse_request({"prompt": "a (fox:1.2)", **body}, form=False, limits=Limits(), factor=8,
                            model_names=("m",))
        return dict(req.settings)

    assert settings()["prompt_syntax"] == "a1111" and settings(prompt_syntax="plain")["prompt_syntax"] == "plain"
    with pytest.raises(APIError) as e:
        settings(prompt_syntax="comfy")
    assert e.value.param == "prompt_syntax"


# ---- textual inversion ---------------------------------------------------------------------

def _embedding_files(folder, widths: dict[str, int], seed: int = 0):
    """Random embeddings in every format: diffusers' (2 vectors), A1111's safetensors (3),
    A1111's .pt (1), and an SD-XL pair (2) where two widths are given."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    width = widths["text_encoder"]
    files = {"diffusers": folder / "learned_embeds.safetensors", "a1111": folder / "easyneg.safetensors",
             "pt": folder / "old.pt"}
    save_file({"mytok": torch.randn(2, width, generator=g)}, str(files["diffusers"]))
    save_file({"emb_params": torch.randn(3, width, generator=g)}, str(files["a1111"]))
    torch.save({"string_to_param": {"*": torch.randn(1, width, generator=g)}, "name": "oldtok"}, str(files["pt"]))
    if "text_encoder_2" in widths:
        files["xl"] = folder / "xlemb.safetensors"
        save_file({"clip_l": torch.randn(2, width, generator=g),
                   "clip_g": torch.randn(2, widths["text_encoder_2"], generator=g)}, str(files["xl"]))
    return files


def test_textual_inversion_matches_diffusers_and_unloads_exactly(ckpts, tmp_path):
    """diffusers' load_textual_inversion with the same file and token gives the same image, in
    the prompt and in the negative, multi-vector included; a1111 syntax reads the token too
    (with weights); unloading gives the images from before, bit for bit."""
    import diffusers

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    files = _embedding_files(tmp_path, {"text_encoder": pipe.text_encoder.config.hidden_size})
    kw = dict(num_inference_steps=2, output_type="np")
    before = pipe("a mytok fox", negative_prompt="easyneg", seed=2, **kw).images
    assert pipe.load_textual_inversion(str(files["diffusers"])) == "mytok"
    assert pipe.load_textual_inversion(str(files["a1111"])) == "easyneg"  # the file's name, as the web UI
    assert [t["vectors"] for t in pipe.textual_inversions] == [2, 3]
    got = pipe("a mytok fox", negative_prompt="easyneg", seed=2, **kw).images
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(files["diffusers"]))
    ref.load_textual_inversion(str(files["a1111"]), token="easyneg")
    want = ref("a mytok fox", negative_prompt="easyneg", generator=torch.Generator().manual_seed(2), **kw).images
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - before).max() > 1e-3
    weighted = pipe("a (mytok:1.0) fox", negative_prompt="easyneg", prompt_syntax="a1111", seed=2, **kw).images
    assert np.abs(weighted - got).max() <= 1e-5  # one batch of both texts: CPU rounding only
    pipe.unload_textual_inversion("mytok")
    assert [t["token"] for t in pipe.textual_inversions] == ["easyneg"]
    pipe.unload_textual_inversion()
    assert np.array_equal(pipe("a mytok fox", negative_prompt="easyneg", seed=2, **kw).images, before)


def test_textual_inversion_sdxl_pairs(tokenizers, tmp_path):
    """SD-XL: clip_l vectors into the first text encoder, clip_g into the second, as diffusers'
    documented two-call load."""
    import diffusers
    from safetensors.torch import load_file

    path = tokenizers[0]
    pipe = Pipeline.from_pretrained(str(path), backend="eager", device="cpu")
    files = _embedding_files(tmp_path, {"text_encoder": pipe.text_encoder.config.hidden_size,
                                        "text_encoder_2": pipe.text_encoder_2.config.hidden_size})
    assert pipe.load_textual_inversion(str(files["xl"]), token="xltok") == "xltok"
    kw = dict(num_inference_steps=2, output_type="np", negative_prompt="ugly")
    got = pipe("a xltok fox", seed=3, **kw).images
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(path))
    ref.set_progress_bar_config(disable=True)
    state = load_file(str(files["xl"]))
    ref.load_textual_inversion(state["clip_l"], token="xltok", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="xltok", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    want = ref("a xltok fox", generator=torch.Generator().manual_seed(3), **kw).images
    assert np.abs(got - want).max() <= TOL
    with pytest.raises(InvalidArgumentError, match="SD-XL checkpoint needs an SD-XL embedding"):
        pipe.load_textual_inversion(str(files["a1111"]))


def test_textual_inversion_errors(ckpts, tmp_path):
    from safetensors.torch import save_file

    from fastsd.errors import CheckpointError

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    width = pipe.text_encoder.config.hidden_size
    files = _embedding_files(tmp_path, {"text_encoder": width, "text_encoder_2": 2 * width})
    with pytest.raises(InvalidArgumentError, match="pickle"):
        pipe.load_textual_inversion(str(files["pt"]))
    assert pipe.load_textual_inversion(str(files["pt"]), allow_pickle=True) == "oldtok"
    with pytest.raises(InvalidArgumentError, match="loaded already"):
        pipe.load_textual_inversion(str(files["pt"]), allow_pickle=True)
    with pytest.raises(InvalidArgumentError, match="SD-XL embedding"):
        pipe.load_textual_inversion(str(files["xl"]))
    save_file({"wide": torch.zeros(1, width + 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(InvalidArgumentError, match="another model"):
        pipe.load_textual_inversion(str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="no textual inversion file"):
        pipe.load_textual_inversion(str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidArgumentError, match="not loaded|no textual inversion with the token"):
        pipe.unload_textual_inversion("nothing")
    assert [t["token"] for t in pipe.textual_inversions] == ["oldtok"]  # the failures changed nothing


def test_cli_embedding_and_server_tag_batches(ckpts, tmp_path):
    """CLI --embedding FILE[:TOKEN] loads it before generating (the PNG records it); a bad one
    is one line and exit 2. The server keeps requests with other <lora:...> tags in other batches."""
    import json

    from PIL import Image
    from safetensors.torch import save_file

    from fastsd.cli import main
    from fastsd.serve import Limits
    from fastsd.serve.api import parse_request

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", device="cpu")
    save_file({"tok": torch.randn(2, pipe.text_encoder.config.hidden_size)}, str(tmp_path / "e.safetensors"))
    base = ["generate", "a mytok fox", "--model", str(ckpts["eps"]), "--steps", "1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a.png"), "--embedding", f"{tmp_path / 'e.safetensors'}:mytok"]) == 0
    assert json.loads(Image.open(tmp_path / "a.png").text["fastsd"])["embeddings"] == [
        {"path": str(tmp_path / "e.safetensors"), "token": "mytok"}]
    assert main([*base, "--out", str(tmp_path / "b.png"), "--embedding", str(tmp_path / "missing.pt")]) == 2
    assert not (tmp_path / "b.png").exists()

    def tags(prompt, **body):
        return parse_request({"prompt": prompt, **body}, form=False, limits=Limits(), factor=8,
                             model_names=("m",)).lora_tags

    assert tags("a fox <lora:ink:0.5>", negative_prompt="<lora:detail>") == (("ink", 0.5), ("detail", 1.0))
    assert tags("a fox") == () and tags("a fox <lora:ink>", prompt_syntax="plain") == ()
