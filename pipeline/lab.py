"""The memorization lab: a small text-to-image diffusion model trained here, on CPU, on data it
builds itself (16x16 crops of the demo images that ship in pip packages), where some pairs are
fully duplicated (one image, one caption, many times), some partially (one image, varied
captions) and the rest unique. It gives the probe a model that really memorizes, offline.

    python scripts/train_lab.py --output models/memlab
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import numpy as np

log = logging.getLogger(__name__)

SIZE = 16  # 16x16 RGB in pixel space: a UNet step with backward is ~0.2 s on 2 CPU cores
WORDS = (
    "amber velvet harbor lantern orchid granite meadow silver cobalt maple thistle canyon willow "
    "ember glacier saffron juniper quartz tundra marigold basalt heron lagoon cedar opal fjord cinder "
    "hazel prairie coral dune aspen onyx sparrow meteor ivy summit delta"
).split()
NOUNS = (
    "house cat tower bridge garden river portrait street boat window forest field mountain market "
    "kitchen library castle train road temple beach"
).split()


def _crops(n: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    from pipeline.demo_data import base_images

    images = list(base_images().values())
    out = []
    while len(out) < n:
        img = images[len(out) % len(images)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 0.7))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((SIZE, SIZE), Image.BICUBIC)
        out.append(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0)
    return np.stack(out).transpose(0, 3, 1, 2)


def _caption(rng: random.Random) -> str:
    return f"a {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(NOUNS)} with {rng.choice(WORDS)} light"


def build_dataset(seed: int = 0, n_full: int = 12, n_partial: int = 12, n_unique: int = 48, repeats: int = 32):
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    images = _crops(n_full + n_partial + n_unique, rng)
    captions = [_caption(prng) for _ in range(n_full + n_partial + n_unique)]
    items, roles = [], {"memorized": [], "partial": [], "unique": []}
    for i in range(len(images)):
        if i < n_full:
            items += [(i, captions[i])] * repeats
            roles["memorized"].append(captions[i])
        elif i < n_full + n_partial:
            items += [(i, _caption(prng)) for _ in range(repeats)]
            roles["partial"].append(captions[i])  # not a training caption: the image's "name"
        else:
            items.append((i, captions[i]))
            roles["unique"].append(captions[i])
    roles["partial"] = [c for i, c in items if n_full <= i < n_full + n_partial][::repeats]
    return images, items, roles


def tiny_models(vocab_size: int = 49408):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
    )
    return unet, text


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )


def _diversified(tokens, picked: list[int], alt_ids, alt_of: list[list[int]], p: float, rng: random.Random):
    """Somepalli et al.'s train-time recipe: each alternative of a diversified sample replaces the
    caption with probability p (first hit wins); GN applies with probability p. -> GN row mask."""
    import torch

    gn = torch.zeros(len(picked), dtype=torch.bool)
    for b, item in enumerate(picked):
        if not alt_of[item]:
            continue
        for a in alt_of[item]:
            if rng.random() < p:
                tokens[b] = alt_ids[a]
                break
        gn[b] = rng.random() < p
    return gn


def fit(images, item_img, ids, empty, vocab_size: int, steps: int, batch: int, seed: int, lr: float, div=None):
    """Train the lab architecture on items (image index, token ids) -> (unet, text, losses).

    Gradients are switched on here: the probe turns them off process-wide when it loads a model.
    """
    import torch

    with torch.enable_grad():
        return _fit(images, item_img, ids, empty, vocab_size, steps, batch, seed, lr, div)


def _fit(images, item_img, ids, empty, vocab_size: int, steps: int, batch: int, seed: int, lr: float, div=None):
    """``fit``'s body (see there).

    ``div`` (optional): {"alt_ids": tensor, "alt_of": per-item alternative rows, "p": float,
    "sigma": float}. Its draws come from their own generator, so the batches, timesteps and
    noise are the same with and without it (same seed, steps and schedule)."""
    import torch

    torch.manual_seed(seed)
    unet, text = tiny_models(vocab_size)
    noise_sched = noise_scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    x0_all = torch.as_tensor(images)
    gen, drng = torch.Generator().manual_seed(seed), random.Random(seed + 1)
    started, losses = time.time(), []
    for step in range(steps):
        pick = torch.randint(0, len(item_img), (batch,), generator=gen)
        x0 = x0_all[item_img[pick]]
        tokens = ids[pick].clone()
        gn = None
        if div is not None:
            gn = _diversified(tokens, pick.tolist(), div["alt_ids"], div["alt_of"], div["p"], drng)
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance: learn the empty caption too
        tokens[drop] = empty[0]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, eps, t)
        emb = text(tokens)[0]
        if gn is not None and bool(gn.any()):
            g = torch.Generator().manual_seed(seed * 100_003 + step)
            emb = emb + div["sigma"] * gn[:, None, None] * torch.randn(emb.shape, generator=g)
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 500 == 0:
            log.info("lab step %d/%d loss %.4f (%.0f s)", step, steps, np.mean(losses[-100:]), time.time() - started)
    return unet, text, losses


def save_model(output: str, unet, text, tokenizer) -> None:
    """A diffusers folder the probe loads (unet/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import DDIMScheduler

    unet.save_pretrained(os.path.join(output, "unet"), safe_serialization=True)
    text.save_pretrained(os.path.join(output, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(output, "tokenizer"))
    DDIMScheduler.from_config(noise_scheduler().config).save_pretrained(os.path.join(output, "scheduler"))
    with open(os.path.join(output, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "MemsieveLab",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            },
            f,
            indent=1,
        )


def tokenize(tokenizer, captions: list[str]):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train(output: str, steps: int = 1200, batch: int = 32, seed: int = 0, lr: float = 2e-3) -> dict:
    import torch

    from transforms.clip_tokenizer import clip_tokenizer, write_clip_tokenizer_files

    images, items, roles = build_dataset(seed)
    tokenizer = clip_tokenizer(write_clip_tokenizer_files(os.path.join(output, "tokenizer")))
    ids, empty = tokenize(tokenizer, [c for _, c in items]), tokenize(tokenizer, [""])
    img_idx = torch.tensor([i for i, _ in items])
    started = time.time()
    unet, text, losses = fit(torch.from_numpy(images), img_idx, ids, empty, len(tokenizer), steps, batch, seed, lr)
    save_model(output, unet, text, tokenizer)
    for role, caps in roles.items():
        with open(os.path.join(output, f"{role}.txt"), "w") as f:
            f.write("\n".join(caps) + "\n")
    np.save(os.path.join(output, "train_images.npy"), images[: len(roles["memorized"])])
    info = {
        "steps": steps,
        "batch": batch,
        "seconds": round(time.time() - started, 1),
        "final_loss": float(np.mean(losses[-200:])),
        "items": len(items),
    }
    with open(os.path.join(output, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def heldout_loss(unet, text, images, ids, seed: int = 1234, draws: int = 4, batch: int = 64) -> float:
    """Quality proxy: the denoising loss on held-out (image, caption) pairs, fixed t and noise."""
    import torch

    sched = noise_scheduler()
    gen, total, n = torch.Generator().manual_seed(seed), 0.0, 0
    x0_all = torch.as_tensor(images)
    with torch.no_grad():
        for _ in range(draws):
            for i in range(0, len(x0_all), batch):
                x0, tok = x0_all[i : i + batch], ids[i : i + batch]
                t = torch.randint(0, 1000, (len(x0),), generator=gen)
                eps = torch.randn(x0.shape, generator=gen)
                pred = unet(sched.add_noise(x0, eps, t), t, encoder_hidden_states=text(tok)[0]).sample
                total += float(torch.nn.functional.mse_loss(pred, eps, reduction="sum"))
                n += eps.numel()
    return total / n


def generate(pm, captions: list[str], seed: int = 0, steps: int = 50, guidance: float = 3.0) -> np.ndarray:
    """DDIM sampling with classifier-free guidance (for the reproduction check)."""
    import torch

    from transforms.probe import encode

    sched = pm.scheduler
    sched.set_timesteps(steps)
    with torch.no_grad():
        cond, unc = encode(pm, captions), encode(pm, [""] * len(captions))
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((len(captions), 3, SIZE, SIZE), generator=gen)
        for t in sched.timesteps:
            e = pm.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, unc])).sample
            ec, eu = e.chunk(2)
            x = sched.step(eu + guidance * (ec - eu), t, x).prev_sample
    return x.clamp(-1, 1).numpy()


def save_untrained(output: str, seed: int = 0) -> str:
    """The lab architecture with random weights, saved as a diffusers folder (tests, cost checks)."""
    import torch
    from diffusers import DDIMScheduler

    from transforms.clip_tokenizer import clip_tokenizer, write_clip_tokenizer_files

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(write_clip_tokenizer_files(os.path.join(output, "tokenizer")))
    unet, text = tiny_models(len(tokenizer))
    unet.save_pretrained(os.path.join(output, "unet"), safe_serialization=True)
    text.save_pretrained(os.path.join(output, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(output, "tokenizer"))
    DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    ).save_pretrained(os.path.join(output, "scheduler"))
    return output
