"""What a long prompt costs the text stage: fastsd's A1111-syntax encoding (chunking, token
table, the text encoder, emphasis) of a prompt of 1, 2 and 3 chunks with its negative, on a
full-size text encoder (SD 1.5's CLIP ViT-L/14 architecture, random weights: the same compute).

    python benchmarks/prompt_cost.py [--device cpu] [--runs 10]

Prints a Markdown table: median seconds per encoding and the ratio to one chunk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastsd.archs import arch
    from fastsd.networks import TextEncoder
    from fastsd.prompts import Vocab, chunk_prompt, empty_chunk, encode_chunks
    from fastsd.synthetic import write_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--arch", default="sd15")
    args = ap.parse_args()
    spec = arch(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), spec["pad_token"])
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id)).eval().to(args.device)
    module, table = TextEncoder(clip), clip.get_input_embeddings().weight
    vocab = Vocab.of(tokenizer)

    def encoder(ids):
        with torch.inference_mode():
            return module(torch.nn.functional.embedding(ids, table))

    def encode(prompt: str, negative: str) -> int:
        chunks = [chunk_prompt(t, tokenizer, vocab) for t in (negative, prompt)]
        hidden, _ = encode_chunks(encoder, chunks, torch.device(args.device), empty_chunk(vocab))
        if hidden.device.type == "cuda":
            torch.cuda.synchronize()
        return hidden.shape[1] // 77

    # the synthetic tokenizer gives a token per character: "word, " is 5 tokens
    prompts = {k: "a (red:1.2) fox, " + ", ".join(["snow"] * (14 * k - 3)) for k in (1, 2, 3)}
    rows, base = [], None
    for k, prompt in prompts.items():
        assert encode(prompt, "[ugly]") == k, k  # and a warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            encode(prompt, "[ugly]")
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        base = base or median
        rows.append(f"| {k} | {k * 77} | {median * 1000:.1f} | {median / base:.2f}x |")
    print(f"text stage, {args.arch} text encoder ({args.device}, {torch.get_num_threads()} threads, "
          f"prompt + negative, median of {args.runs})\n")
    print("| chunks | tokens | ms | vs 1 chunk |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
