"""Probe cost: UNet forwards per caption, and probe throughput against a bare UNet forward loop at
the same batch, for a tiny (lab) and an SD1.5-sized UNet (random weights), on this machine.

    python scripts/bench_probe.py [--sd-batches 2] [--tiny-batches 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sd15_folder(root: str) -> str:
    """SD1.5's UNet architecture (4x64x64 latents, cross-attention 768) with random weights, and a
    CLIP text encoder of SD1.5's width, saved as a diffusers folder."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from transforms.clip_tokenizer import clip_tokenizer, write_clip_tokenizer_files

    torch.manual_seed(0)
    tok = clip_tokenizer(write_clip_tokenizer_files(os.path.join(root, "tokenizer")))
    tok.save_pretrained(os.path.join(root, "tokenizer"))
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(os.path.join(root, "unet"))
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )
    ).save_pretrained(os.path.join(root, "text_encoder"))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).save_pretrained(
        os.path.join(root, "scheduler")
    )
    return root


def bench(model: str, batch: int, batches: int) -> None:
    import torch

    from transforms.probe import MagnitudeScorer, encode, first_timestep, load_probe, noise

    pm = load_probe(model, "cpu")
    scorer = MagnitudeScorer(pm, seeds=1)
    captions = [f"a photo number {i} of a quiet street" for i in range(batch * batches)]
    pm.forwards = 0
    scorer.score(captions[:batch])  # warm-up (also fills the uncond cache, counted)
    t = time.perf_counter()
    for i in range(0, len(captions), batch):
        scorer.score(captions[i : i + batch])
    probe_s = time.perf_counter() - t
    forwards = pm.forwards - batch  # the warm-up batch's own captions are not in the timed set
    t_step = first_timestep(pm.scheduler)
    with torch.no_grad():  # the bare loop: the same text encoding and one UNet forward per batch
        x = noise(pm, 0)
        t = time.perf_counter()
        for i in range(0, len(captions), batch):
            emb = encode(pm, captions[i : i + batch])
            pm.unet(x.expand(batch, -1, -1, -1), t_step, encoder_hidden_states=emb)
        bare_s = time.perf_counter() - t
    n = len(captions)
    print(
        f"{os.path.basename(model)}: batch {batch}, {n} captions: probe {n / probe_s:.2f} captions/s, bare UNet loop "
        f"{n / bare_s:.2f} captions/s, ratio {bare_s / probe_s:.1%}; UNet forwards per caption {forwards / n:.3f} "
        f"(limit 1 + 1/batch = {1 + 1 / batch:.3f}; includes the one cached uncond forward)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny-batches", type=int, default=20)
    parser.add_argument("--sd-batches", type=int, default=2)
    parser.add_argument("--only", choices=["tiny", "sd", "both"], default="both")
    args = parser.parse_args()
    from pipeline.lab import save_untrained

    with tempfile.TemporaryDirectory() as tmp:
        if args.only in ("tiny", "both"):
            bench(save_untrained(os.path.join(tmp, "lab-tiny")), 16, args.tiny_batches)
        if args.only in ("sd", "both"):
            bench(sd15_folder(os.path.join(tmp, "sd15-size")), 2, args.sd_batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
