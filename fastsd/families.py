"""Model families: what differs between SD 1.x/2.x and its successors lives here.

A family owns prompt encoding (tokenizers, text encoders, pooled embeddings) and the
extra inputs its UNet takes; the pipeline asks it for the UNet's conditioning inputs and
never branches on the family. Stable Diffusion 1.x/2.x: one CLIP tokenizer and text
encoder, the UNet takes only the text embeddings. SD-XL: a second tokenizer and encoder,
and `text_embeds` / `time_ids` through `extra_unet_inputs` and `encode`.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Callable

import torch
from torch import nn

from .embeddings import TextualInversions, flatten
from .guidance import guidance_embedding
from .networks import (
    BATCH,
    FLOAT32,
    SD_NETWORKS,
    ControlNet,
    ImageEncoder,
    NetworkSpec,
    TensorSpec,
    TextEncoder,
    UNet,
    XLTextEncoder,
    XLUNet,
    controlnet_spec,
    guidance_embedding_spec,
    network_specs,
    residual_specs,
    wrap,
)
from .prompts import A1111, Vocab, chunk_prompt, empty_chunk, encode_chunks
from .settings import Defaults

log = logging.getLogger(__name__)

SHOWN_CHARS = 100  # of dropped prompt text in the truncation warning


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return repr(text) if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


class StableDiffusion:
    """SD 1.x / 2.x (epsilon or v), inpainting variants included."""

    name = "sd"
    networks: tuple[str, ...] = SD_NETWORKS
    extra_unet_inputs: tuple[TensorSpec, ...] = ()  # only sample, timestep, encoder_hidden_states
    unet_module: type[nn.Module] = UNet  # forward arguments: the UNet spec's inputs, in order
    text_module: type[TextEncoder] = TextEncoder
    defaults = Defaults()  # diffusers' defaults of the family's pipelines (a call's None means these)

    def __init__(self, info, tokenizer, tokenizer_2=None, unet_config=None, controlnets=()):
        """`unet_config` gives the ControlNet residuals the UNet may take (None: none);
        `controlnets` (LoadedControlNet) become networks controlnet, controlnet_2, ..."""
        self.info = info
        self.tokenizers = {"text_encoder": tokenizer, "text_encoder_2": tokenizer_2}
        residuals = residual_specs(unet_config) if unet_config is not None else ()
        width = getattr(info, "guidance_embedding_dim", 0)  # an LCM-distilled UNet's: the guidance as an input
        unet_inputs = self.extra_unet_inputs + ((guidance_embedding_spec(width),) if width else ())
        self.specs: dict[str, NetworkSpec] = network_specs(info, unet_inputs, self.text_widths(), residuals)
        self.controlnets = dict(zip(controlnet_names(len(controlnets)), controlnets, strict=True))
        for name, cn in self.controlnets.items():
            self.specs[name] = controlnet_spec(info, self.extra_unet_inputs, residuals,
                                               int(cn.config.conditioning_channels))
        self.networks = type(self).networks + tuple(self.controlnets)
        self._lock = threading.Lock()  # tokenizers keep truncation/padding state between calls
        self._vocabs = {n: Vocab.of(t) for n, t in self.tokenizers.items() if t is not None}
        self.embeddings = TextualInversions()  # loaded by the pipeline (load_textual_inversion)
        self.ip_adapters: tuple = ()  # a build's IP-Adapters (image_prompts.attach_adapters): the UNet takes their
        self.image_encoders: dict = {}  # inputs, and their image encoders are networks with entries of their own

    @property
    def tokenizer(self):
        return self.tokenizers["text_encoder"]

    def text_widths(self) -> dict[str, tuple[int, int]] | None:
        """Each text encoder's (hidden width, pooled width or 0); None: SD's one encoder."""
        return None

    def modules(self, ckpt, clip_skip: int = 0) -> dict[str, nn.Module]:
        """The networks as modules named and ordered like their specs."""
        extra = tuple(t.name for t in self.extra_unet_inputs)
        return wrap(ckpt, clip_skip, self.unet_module, self.text_module) | {
            name: ControlNet(cn.model, extra) for name, cn in self.controlnets.items()} | {
            name: ImageEncoder(e.model) for name, e in self.image_encoders.items()}

    def token_ids(self, texts: list[str], device: torch.device, network: str = "text_encoder") -> torch.Tensor:
        """(len(texts), 77) int64, padded with the tokenizer's own pad token, truncated with a
        warning that shows what was dropped."""
        n, tokenizer = self.info.max_tokens, self.tokenizers[network]
        if self.embeddings:
            return self._token_ids_with_embeddings(texts, device, network)
        with self._lock:
            ids = tokenizer(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
            for text in dict.fromkeys(texts):  # each distinct prompt once, in order
                full = tokenizer(text, truncation=False, verbose=False).input_ids  # [BOS, ..., EOS]
                if len(full) > n:
                    dropped = tokenizer.decode(full[n - 1:-1])
                    log.warning("prompt longer than %d tokens was truncated; %d tokens dropped: %s",
                                n, len(full) - n, _shorten(dropped))
        return ids.to(device)

    def use_text_encoders(self, ckpt) -> None:
        """The checkpoint's text encoders as the runtime needs them: each one's token table (the
        runtime looks the ids up: the networks take token embeddings, so textual inversions'
        vectors reach every backend) and how it finds the end of text for its pooled output."""
        self.token_tables, self._eos = {}, {}
        for net in ("text_encoder", "text_encoder_2"):
            config = ckpt.configs.get(net)
            if config is not None:  # neither builds a text encoder not built yet (fastsd/components.py)
                self.token_tables[net] = ckpt.token_table(net)
                eos = config["eos_token_id"]
                self._eos[net] = (eos, eos == 2)  # 2: transformers' legacy configs read the highest id

    def text_inputs(self, network: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """A text encoder's inputs for token ids (N, 77): inputs_embeds (N, 77, D) from its token
        table (textual inversions' vectors after the checkpoint's), and for one with a pooled
        output eos_mask (N, 77), one-hot where CLIP reads it (as transformers finds it: the first
        end-of-text token, or for legacy configs the highest id)."""
        table = self.embeddings.table(network, self.token_tables[network].weight)
        out = {"inputs_embeds": nn.functional.embedding(ids.to(table.device), table)}
        if "eos_mask" in self.specs[network].input_names:
            eos, legacy = self._eos[network]
            at = ids.argmax(dim=-1) if legacy else (ids == eos).int().argmax(dim=-1)
            out["eos_mask"] = nn.functional.one_hot(at, ids.shape[1]).float()
        return out

    def run_text(self, encoders: dict[str, Callable], network: str, ids: torch.Tensor):
        """The text encoder `network` on token ids."""
        return encoders[network](self.text_inputs(network, ids))

    def _token_ids_with_embeddings(self, texts: list[str], device: torch.device, network: str) -> torch.Tensor:
        """token_ids where textual inversions are loaded: each loaded token's words replaced by
        its vector ids (as diffusers' added tokens, expanded), then truncated and padded as the
        tokenizer does."""
        n, vocab = self.info.max_tokens, self._vocabs[network]
        rows = []
        with self._lock:
            words = self.tokenizers[network](texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
        for text, ids in zip(texts, words, strict=True):
            ids = flatten(self.embeddings.split(ids, network))
            if len(ids) > n - 2:
                log.warning("prompt longer than %d tokens was truncated; %d tokens dropped: %s", n, len(ids) - n + 2,
                            _shorten(text))
                ids = ids[:n - 2]
            rows.append([vocab.bos, *ids, vocab.eos] + [vocab.pad] * (n - 2 - len(ids)))
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def weighted(self, encoders: dict[str, Callable], texts: dict[str, list[str]],
                 device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """A1111-syntax texts, per text encoder, encoded in chunks (fastsd/prompts.py): each
        encoder's (N, 77 * k, C) hidden states and pooled output (None for one without), every
        text padded with the empty prompt's chunk to the same k chunks, the most any text of
        any encoder needs."""
        with self._lock:
            chunks = {net: [chunk_prompt(t, self.tokenizers[net], self._vocabs[net],
                                         partial(self.embeddings.split, network=net) if self.embeddings else None)
                            for t in ts] for net, ts in texts.items()}
        k = max(len(c) for cs in chunks.values() for c in cs)
        return {net: encode_chunks(partial(self.run_text, encoders, net), cs, device, empty_chunk(self._vocabs[net]), k)
                for net, cs in chunks.items()}

    def encode(self, encoders: dict[str, Callable], req, device: torch.device) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for Request `req`: encoder_hidden_states (B*n, 77, D),
        or with CFG (2*B*n, 77, D) [uncond; cond]. Prompts and negatives are encoded in two
        calls, as diffusers does (CPU kernels round a batch of 2B differently). Embeddings given
        by the caller are used as they are (diffusers' prompt_embeds / negative_prompt_embeds).
        With prompt_syntax "a1111", texts are read as AUTOMATIC1111 reads them (77 * k tokens,
        prompts and negatives encoded together)."""
        if req.prompt_syntax == A1111 and req.prompt_embeds is None:
            texts = (req.negative_prompts if req.do_cfg else []) + req.prompts
            emb, _ = self.weighted(encoders, {"text_encoder": texts}, device)["text_encoder"]
        else:
            emb = self._plain(encoders, req, device)
        emb = emb.repeat_interleave(req.n, dim=0)  # per prompt: n copies, as diffusers
        return {"encoder_hidden_states": emb, **self.guidance_inputs(req, emb.shape[0], device)}

    def guidance_inputs(self, req, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A guidance-distilled UNet's timestep_cond: the embedding of guidance_scale - 1 per row
        (as diffusers' LCM and SD pipelines give it; such a UNet runs without CFG); none else."""
        width = getattr(self.info, "guidance_embedding_dim", 0)
        if not width:
            return {}
        return {"timestep_cond": guidance_embedding(req.guidance_scale - 1.0, width, rows).to(device)}

    def _plain(self, encoders: dict[str, Callable], req, device: torch.device) -> torch.Tensor:
        """diffusers' reading, or the caller's embeddings: [uncond; cond] with CFG."""
        if req.prompt_embeds is not None:
            emb = req.prompt_embeds.to(device).float()
        else:
            emb = self.run_text(encoders, "text_encoder", self.token_ids(req.prompts, device))
        if not req.do_cfg:
            return emb
        if req.negative_prompt_embeds is not None:
            neg = req.negative_prompt_embeds.to(device).float()
        else:
            neg = self.run_text(encoders, "text_encoder", self.token_ids(req.negative_prompts, device))
        return torch.cat([neg, emb])


class StableDiffusionXL(StableDiffusion):
    """SD-XL base (and its 9-channel inpainting variant), as StableDiffusionXL{,Img2Img,
    Inpaint}Pipeline: two tokenizers and text encoders whose hidden states (layer -2) are
    concatenated on features, the second one's projected pooled output as `text_embeds`,
    and `time_ids` (original h, w, crop top, left, target h, w) per row."""

    name = "sdxl"
    networks = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    unet_module = XLUNet
    text_module = XLTextEncoder
    defaults = Defaults(guidance_scale=5.0, inpaint_guidance_scale=7.5, img2img_strength=0.3,
                        inpaint_strength=0.9999, takes_xl=True,
                        controlled=Defaults(guidance_scale=5.0, inpaint_guidance_scale=5.0, img2img_strength=0.8,
                                            inpaint_strength=0.9999, takes_xl=True, control_scale=(1.0, 0.8, 1.0)))

    def __init__(self, info, tokenizer, tokenizer_2, widths: dict[str, tuple[int, int]], unet_config=None,
                 controlnets=()):
        self._widths = widths
        pooled = widths["text_encoder_2"][1]
        self.extra_unet_inputs = (TensorSpec("text_embeds", (BATCH, pooled)),
                                  TensorSpec("time_ids", (BATCH, 6), FLOAT32, sample=64.0))
        super().__init__(info, tokenizer, tokenizer_2, unet_config, controlnets)

    def text_widths(self) -> dict[str, tuple[int, int]]:
        return self._widths

    def _embed(self, encoders, first: list[str], second: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, (hidden_2, pooled) = (
            self.run_text(encoders, "text_encoder", self.token_ids(first, device)),
            self.run_text(encoders, "text_encoder_2", self.token_ids(second, device, "text_encoder_2")))
        return torch.cat([hidden, hidden_2], dim=-1), pooled

    def encode(self, encoders: dict[str, Callable], req, device: torch.device) -> dict[str, torch.Tensor]:
        """encoder_hidden_states, text_embeds and time_ids, [uncond; cond] with CFG. As diffusers:
        prompt_2 / negative_prompt_2 default to the first texts (so does an empty string); the
        negatives are zeros when no negative_prompt is given and the checkpoint says
        force_zeros_for_empty_prompt (whatever negative_prompt_2 is)."""
        time_ids = self.time_ids(req.original_size, req.crops_coords_top_left, req.target_size, req)
        if req.prompt_syntax == A1111 and req.prompt_embeds is None:
            emb, pooled = self._weighted_xl(encoders, req, device)
        else:
            emb, pooled = self._plain_xl(encoders, req, device)
        rows = emb.shape[0] * req.n
        return {"encoder_hidden_states": emb.repeat_interleave(req.n, dim=0),
                "text_embeds": pooled.repeat_interleave(req.n, dim=0),
                "time_ids": self._time_id_rows(time_ids, req, rows).to(device),
                **self.guidance_inputs(req, rows, device)}

    def _plain_xl(self, encoders, req, device) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' reading, or the caller's embeddings: hidden states and pooled, [uncond;
        cond] with CFG."""
        if req.prompt_embeds is not None:
            emb, pooled = req.prompt_embeds.to(device).float(), req.pooled_prompt_embeds.to(device).float()
        else:
            emb, pooled = self._embed(encoders, req.prompts, req.prompts_2 or req.prompts, device)
        if not req.do_cfg:
            return emb, pooled
        if req.negative_prompt_embeds is not None:
            neg = req.negative_prompt_embeds.to(device).float()
            neg_pooled = req.negative_pooled_prompt_embeds.to(device).float()
        elif not req.negative_given and self.info.force_zeros_for_empty_prompt:
            neg, neg_pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._embed(encoders, req.negative_prompts, req.negative_prompts_2 or
                                          req.negative_prompts, device)
        return torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])

    def _weighted_xl(self, encoders, req, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111 syntax: both encoders' chunks ([uncond; cond] with CFG). Negatives that are all
        empty are zeros where the checkpoint says force_zeros_for_empty_prompt (as the web UI
        zeroes empty SD-XL negatives), their padding chunks the empty prompt's."""
        first, second = req.prompts, req.prompts_2 or req.prompts
        if req.do_cfg:
            first, second = req.negative_prompts + first, (req.negative_prompts_2 or req.negative_prompts) + second
        out = self.weighted(encoders, {"text_encoder": first, "text_encoder_2": second}, device)
        (hidden, _), (hidden_2, pooled) = out["text_encoder"], out["text_encoder_2"]
        emb = torch.cat([hidden, hidden_2], dim=-1)
        negatives = len(req.negative_prompts) if req.do_cfg else 0
        zero = negatives and self.info.force_zeros_for_empty_prompt and not any(
            req.negative_prompts + (req.negative_prompts_2 or []))
        if zero:  # the negatives' own chunk (an empty prompt has one) is zeros
            emb, pooled = emb.clone(), pooled.clone()  # out of the encoders' inference mode
            emb[:negatives, :self.info.max_tokens] = 0
            pooled[:negatives] = 0
        return emb, pooled

    def _time_id_rows(self, ids: torch.Tensor, req, rows: int) -> torch.Tensor:
        """(rows, 6) time ids in diffusers' layout, which differs by pipeline. txt2img: the
        negative ids are the prompt's unless both negative sizes are given, and the [neg, cond]
        pair is repeated (rows alternate); img2img / inpaint: each negative size defaults to the
        prompt's, the crop is always the prompt's (negative_crops_coords_top_left is unused
        there), and the rows are [neg x B; cond x B]."""
        if not req.do_cfg:
            return ids[None].repeat(rows, 1)
        if req.image is None:
            given = req.negative_original_size is not None and req.negative_target_size is not None
            neg = self.time_ids(req.negative_original_size, req.negative_crops_coords_top_left,
                                req.negative_target_size, req) if given else ids
            return torch.stack([neg, ids]).repeat(rows // 2, 1)
        neg = self.time_ids(req.negative_original_size or req.original_size, req.crops_coords_top_left,
                            req.negative_target_size or req.target_size, req)  # diffusers: the prompt's crop
        return torch.cat([neg[None].repeat(rows // 2, 1), ids[None].repeat(rows // 2, 1)])

    @staticmethod
    def time_ids(original_size, crops_coords_top_left, target_size, req) -> torch.Tensor:
        """(6,) float32: original (h, w), crop (top, left), target (h, w); sizes default to
        the call's height and width (img2img: the input image's), the crop to (0, 0)."""
        size = (req.height, req.width)
        values = (*(original_size or size), *(crops_coords_top_left or (0, 0)), *(target_size or size))
        return torch.tensor(values, dtype=torch.float32)


def controlnet_names(count: int) -> tuple[str, ...]:
    """The networks of `count` ControlNets: controlnet, controlnet_2, ... (as text_encoder_2)."""
    return tuple("controlnet" if i == 0 else f"controlnet_{i + 1}" for i in range(count))


def family_for(ckpt, controlnets=()) -> StableDiffusion:
    """The family of a loaded checkpoint: SD-XL where it has a second text encoder, else
    SD 1.x/2.x; with `controlnets` (LoadedControlNet, checked to fit) as networks of it."""
    configs = ckpt.configs
    unet_config = configs.get("unet")
    if ckpt.info.family == "sdxl":
        widths = {"text_encoder": (int(configs["text_encoder"]["hidden_size"]), 0),
                  "text_encoder_2": (int(configs["text_encoder_2"]["hidden_size"]),
                                     int(configs["text_encoder_2"]["projection_dim"]))}
        family = StableDiffusionXL(ckpt.info, ckpt.tokenizer, ckpt.tokenizer_2, widths, unet_config, controlnets)
    else:
        family = StableDiffusion(ckpt.info, ckpt.tokenizer, None, unet_config, controlnets)
    family.use_text_encoders(ckpt)
    return family
