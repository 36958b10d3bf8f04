"""Memorization probe (Wen et al., ICLR 2024) for Stable-Diffusion-family models, batched.

m(c) = || eps(x_T, e_c) - eps(x_T, e_empty) ||_2 at the first sampling step (t = 981 of 1000
for 50 DDIM steps), averaged over seeds. One fixed x_T per seed is shared by every caption, so
the unconditional prediction is computed once per seed and reused: 1 UNet forward per caption
per seed (plus one per seed for the cache). Also: the anisotropy metric (Asthana &
Belagiannis: channel-wise cosine between eps_uncond and eps_cond - eps_uncond at a low-noise
step, on the same pure noise), token attribution (gradient of m w.r.t. the text-encoder output,
L2 norm per token), and threshold calibration on captions known not to be memorized.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


from pipeline.config import ConfigError  # noqa: E402  (after the module docstring's imports)


class ProbeError(ConfigError):
    """The model cannot be probed as configured (e.g. tokenizer and text encoder disagree): exit 2."""


@dataclass
class ProbeModel:
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: str
    dtype: Any
    name: str
    forwards: int = 0  # UNet forwards counted, for the cost check


def _device_dtype(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


def load_probe(model: str, device: str = "auto") -> ProbeModel:
    """A diffusers folder or hub id (unet/, text_encoder/, tokenizer/, scheduler/), loaded once."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = os.path.isdir(model)
    kw = {"local_files_only": local or os.environ.get("HF_HUB_OFFLINE") == "1"}
    dev, dtype = _device_dtype(device)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw).to(dev).eval()
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kw).to(dev).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    check_vocabulary(tokenizer, text)
    torch.set_grad_enabled(False)
    return ProbeModel(unet, text, tokenizer, scheduler, dev, dtype, os.path.basename(model.rstrip("/")) or model)


def check_vocabulary(tokenizer, text_encoder) -> None:
    """transformers 5 builds a 2-token CLIPTokenizer without complaint when its files are missing."""
    n_tok, n_enc = len(tokenizer), int(text_encoder.config.vocab_size)
    if n_tok != n_enc:
        raise ProbeError(
            f"tokenizer has {n_tok} tokens but the text encoder expects {n_enc}: refusing to probe "
            "(a CLIPTokenizer built without its vocabulary files?)"
        )


def first_timestep(scheduler, steps: int = 50) -> int:
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[0])


def encode(pm: ProbeModel, captions: list[str]):
    import torch

    tok = pm.tokenizer(
        captions, padding="max_length", max_length=pm.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.set_grad_enabled(torch.is_grad_enabled()):
        return pm.text_encoder(tok.input_ids.to(pm.device))[0]


def noise(pm: ProbeModel, seed: int):
    import torch

    cfg = pm.unet.config
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return torch.randn(shape, generator=gen).to(pm.device, pm.dtype)


def _eps(pm: ProbeModel, x, t: int, emb):
    pm.forwards += int(emb.shape[0])  # UNet forwards counted per sample in the batch
    return pm.unet(x.expand(emb.shape[0], -1, -1, -1), t, encoder_hidden_states=emb).sample


class MagnitudeScorer:
    """Scores caption batches; x_T and eps(x_T, empty) are cached per seed across batches."""

    def __init__(self, pm: ProbeModel, seeds: int = 1, steps: int = 50, low_t: int = 41):
        self.pm, self.seeds = pm, seeds
        self.t = first_timestep(pm.scheduler, steps)
        self.low_t = low_t
        self._cache: dict[tuple[int, int], Any] = {}
        self._empty = None

    def _uncond(self, seed: int, t: int):
        import torch

        if (seed, t) not in self._cache:
            if self._empty is None:
                self._empty = encode(self.pm, [""])
            with torch.no_grad():
                self._cache[(seed, t)] = _eps(self.pm, noise(self.pm, seed), t, self._empty)
        return self._cache[(seed, t)]

    def magnitude(self, captions: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            emb = encode(self.pm, captions)
            total = torch.zeros(len(captions), device=self.pm.device, dtype=torch.float32)
            for seed in range(self.seeds):
                diff = _eps(self.pm, noise(self.pm, seed), self.t, emb) - self._uncond(seed, self.t)
                total += diff.float().flatten(1).norm(dim=1)
        return (total / self.seeds).cpu().numpy()

    def anisotropy(self, captions: list[str]) -> np.ndarray:
        """Mean channel-wise cosine between eps_uncond and eps_cond - eps_uncond at a low-noise step."""
        import torch

        with torch.no_grad():
            emb = encode(self.pm, captions)
            total = torch.zeros(len(captions), device=self.pm.device, dtype=torch.float32)
            for seed in range(self.seeds):
                unc = self._uncond(seed, self.low_t).float()
                diff = _eps(self.pm, noise(self.pm, seed), self.low_t, emb).float() - unc
                cos = torch.nn.functional.cosine_similarity(diff.flatten(2), unc.expand_as(diff).flatten(2), dim=2)
                total += cos.mean(dim=1)
        return (total / self.seeds).cpu().numpy()

    def score(self, captions: list[str], metric: str = "magnitude") -> np.ndarray:
        out = self.magnitude(captions) if metric == "magnitude" else self.anisotropy(captions)
        empty = np.array([not c.strip() for c in captions])
        out[empty] = 0.0  # the empty caption is the unconditional prediction: exactly 0
        return out


def token_attribution(pm: ProbeModel, caption: str, seed: int = 0, steps: int = 50) -> list[tuple[str, float]]:
    """Which tokens drive the score: d m / d (text-encoder output), L2 norm per token."""
    import torch

    t = first_timestep(pm.scheduler, steps)
    tok = pm.tokenizer(
        [caption], padding="max_length", max_length=pm.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.enable_grad():
        emb = pm.text_encoder(tok.input_ids.to(pm.device))[0].detach().requires_grad_(True)
        empty = encode(pm, [""]).detach()
        x = noise(pm, seed)
        diff = pm.unet(x, t, encoder_hidden_states=emb).sample - pm.unet(x, t, encoder_hidden_states=empty).sample
        diff.float().norm().backward()
    norms = emb.grad[0].float().norm(dim=1).cpu().numpy()
    ids = tok.input_ids[0].tolist()
    n = ids.index(pm.tokenizer.eos_token_id) + 1 if pm.tokenizer.eos_token_id in ids else len(ids)
    tokens = pm.tokenizer.convert_ids_to_tokens(ids[:n])
    return [(tk, float(v)) for tk, v in zip(tokens, norms[:n], strict=True)]


def calibrate(reference_scores: np.ndarray, target_fpr: float) -> float:
    """Threshold so that a share target_fpr of known-not-memorized captions would be flagged."""
    return float(np.quantile(np.asarray(reference_scores, dtype=np.float64), 1.0 - target_fpr, method="higher"))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg, alternative="greater").statistic / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    thr = calibrate(neg, fpr)
    return float((np.asarray(pos) > thr).mean())


def select_for_budget(rows: list[dict], budget: str, fraction: float, seed: int, min_cluster: int = 2) -> list[dict]:
    """Which captions to score: all; representatives of duplicate clusters (size >= min_cluster);
    captions carrying trigger codes; or a seeded random sample."""
    import random

    if budget == "all":
        return rows
    if budget == "cluster_representatives":
        return [r for r in rows if r.get("cluster_size", 1) >= min_cluster and r.get("is_representative", True)]
    if budget == "triggers":
        return [r for r in rows if r.get("trigger_codes")]
    rng = random.Random(seed)
    return [r for r in rows if rng.random() < fraction]
