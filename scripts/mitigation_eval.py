"""Does training on memsieve's output copy less? The lab's retraining experiment (issue 14).

    python scripts/mitigation_eval.py [--out out/mitigation] [--steps 1200] [--seeds 4] [--threads 2]

Builds the harder lab set (scripts/make_lab_set.py) and trains the lab architecture (same seed,
steps, batch and schedule) three times, on
  A  the raw shards;
  B  the raw shards after exact-byte dedup (sha256 of the image bytes; first key kept);
  C  memsieve's output: `python -m pipeline.cli run jobs/lab.yaml` on the shards, its manifest's
     drop decisions applied, and its diversify/ rows used during training the way a training
     team would (methods.md section 5: each alternative caption (MC/RT/CWR/RC/RNA) replaces the
     caption with probability train_probability, GN adds sigma * N(0, 1) to the text embedding
     with the same probability).
Then it samples (DDIM 50 steps, guidance 3) from the training captions of every repeated image
and 24 singletons, one sample per seed, and counts replications: a generation whose nearest raw
training image (pixel cosine after centring, 16x16) is closer than a threshold calibrated on
unrelated pairs (the 99th percentile of held-out images' nearest-training-image similarity).
Quality proxy: the denoising loss on held-out (image, caption) pairs. Writes OUT/table.txt and
OUT/result.json; the last line reads
`replication A=<rate> B=<rate> C=<rate> quality_C_over_A=<ratio>` (rates over images repeated 8+ times).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.lab import SIZE  # noqa: E402

log = logging.getLogger("mitigation_eval")
COUNTS = (1, 2, 4, 8, 16, 32)
SINGLES_GENERATED = 24


def pixels(data: bytes | np.ndarray) -> np.ndarray:
    """Image bytes (or a uint8 HxWx3 array) -> SIZE x SIZE float32 CHW in [-1, 1], as the lab trains."""
    from PIL import Image

    img = Image.fromarray(data) if isinstance(data, np.ndarray) else Image.open(io.BytesIO(data))
    img = img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def read_shards(shard_dir: str) -> dict[str, dict]:
    """key -> {"image": bytes, "caption": str} from webdataset tars."""
    out: dict[str, dict] = {}
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                if ext in ("jpg", "txt"):
                    data = tar.extractfile(m).read()
                    out.setdefault(key, {})["image" if ext == "jpg" else "caption"] = (
                        data if ext == "jpg" else data.decode()
                    )
    return out


def exact_dedup(samples: dict[str, dict]) -> list[str]:
    seen, keep = set(), []
    for key in sorted(samples):
        digest = hashlib.sha256(samples[key]["image"]).hexdigest()
        if digest not in seen:
            seen.add(digest)
            keep.append(key)
    return keep


def run_memsieve(shard_dir: str, out: str) -> dict:
    """memsieve on the shards -> {"keep": keys not dropped, "alternatives": key -> [captions], "p", "sigma"}."""
    import pyarrow.dataset as ds

    done = os.path.join(out, "run.json")
    if not os.path.isfile(done) or os.path.getmtime(done) < os.path.getmtime(shard_dir):  # else: this set's run
        cmd = [sys.executable, "-m", "pipeline.cli", "run", os.path.join(ROOT, "jobs", "lab.yaml")]
        cmd += ["--input", os.path.join(shard_dir, "*.tar"), "--output", out]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    manifest = ds.dataset(os.path.join(out, "manifest"), format="parquet").to_table(columns=["key", "decision"])
    decisions = zip(manifest["key"].to_pylist(), manifest["decision"].to_pylist(), strict=True)
    keep = sorted(k for k, d in decisions if d != "drop")
    div = ds.dataset(os.path.join(out, "diversify"), format="parquet").to_table().to_pylist()
    sigmas = {r["gaussian_noise_sigma"] for r in div} or {0.1}
    with open(os.path.join(out, "run.json")) as f:
        cfg = json.load(f).get("config", {})
    p = float(cfg.get("diversify", {}).get("train_probability", 0.1))
    return {"keep": keep, "alternatives": {r["key"]: r["alternatives"] for r in div}, "p": p, "sigma": max(sigmas)}


def train_setting(name, keys, samples, tokenizer, args, alternatives=None, p=0.1, sigma=0.1):
    import torch

    from pipeline.lab import fit, tokenize

    images = np.stack([pixels(samples[k]["image"]) for k in keys])
    ids, empty = tokenize(tokenizer, [samples[k]["caption"] for k in keys]), tokenize(tokenizer, [""])
    div = None
    if alternatives:
        alts, alt_of = [], []
        for k in keys:
            alt_of.append(list(range(len(alts), len(alts) + len(alternatives.get(k, [])))))
            alts += alternatives.get(k, [])
        div = {"alt_ids": tokenize(tokenizer, alts or [""]), "alt_of": alt_of, "p": p, "sigma": sigma}
    started = time.time()
    unet, text, losses = fit(
        images, torch.arange(len(keys)), ids, empty, len(tokenizer), args.steps, args.batch, args.seed, args.lr, div
    )
    log.info("%s: %d items, %.0f s, final loss %.4f", name, len(keys), time.time() - started, np.mean(losses[-100:]))
    return unet.eval(), text.eval(), {"items": len(keys), "seconds": round(time.time() - started, 1)}


def centred_unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


def nearest(queries: np.ndarray, pool_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = centred_unit(queries) @ pool_unit.T
    return sims.max(1), sims.argmax(1)


def prompts(truth: dict) -> list[tuple[str, int, str]]:
    """(image_id, count, caption): every repeated image and the first singletons."""
    rows = [(i, v["count"], v["caption"]) for i, v in sorted(truth["images"].items()) if v["count"] >= 2]
    singles = [(i, 1, v["caption"]) for i, v in sorted(truth["images"].items()) if v["kind"] == "single"]
    return rows + singles[:SINGLES_GENERATED]


def evaluate(unet, text, tokenizer, truth, pool_unit, pool_ids, tau, held, args) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from pipeline.lab import generate, heldout_loss, noise_scheduler, tokenize
    from transforms.probe import ProbeModel

    sched = DDIMScheduler.from_config(noise_scheduler().config)
    pm = ProbeModel(unet, text, tokenizer, sched, "cpu", torch.float32, "lab")
    rows = prompts(truth)
    hits: dict[int, list[float]] = {c: [] for c in COUNTS}
    own: dict[int, list[float]] = {c: [] for c in COUNTS}
    sims: dict[int, list[float]] = {c: [] for c in COUNTS}
    for seed in range(args.seeds):
        gen = np.concatenate(
            [generate(pm, [r[2] for r in rows[i : i + 64]], seed=seed) for i in range(0, len(rows), 64)]
        )
        sim, idx = nearest(gen, pool_unit)
        for (img_id, count, _), s, j in zip(rows, sim, idx, strict=True):
            hits[count].append(float(s > tau))
            own[count].append(float(s > tau and pool_ids[j] == img_id))
            sims[count].append(float(s))
    loss = heldout_loss(unet, text, held["images"], tokenize(tokenizer, held["captions"]))
    return {
        "replication_by_count": {c: float(np.mean(v)) for c, v in hits.items() if v},
        "own_image_by_count": {c: float(np.mean(v)) for c, v in own.items() if v},
        "mean_nearest_similarity_by_count": {c: float(np.mean(v)) for c, v in sims.items() if v},
        "replication_8plus": float(np.mean([x for c in (8, 16, 32) for x in hits[c]])),
        "heldout_loss": loss,
    }


def table(results: dict, tau: float, sizes: dict) -> str:
    lines = [f"replication threshold (pixel cosine, 99th pct of held-out nearest-training similarity): {tau:.3f}"]
    lines.append("setting  items  " + "  ".join(f"x{c:<5d}" for c in COUNTS) + "  8+     heldout_loss")
    for name, r in results.items():
        by = {int(c): v for c, v in r["replication_by_count"].items()}  # (JSON keys are strings)
        cells = "  ".join(f"{by.get(c, float('nan')):.3f} " for c in COUNTS)
        lines.append(f"{name:<8s} {sizes[name]:5d}  {cells}  {r['replication_8plus']:.3f}  {r['heldout_loss']:.5f}")
    lines.append("own-image replications (nearest raw image is the prompt's own image):")
    for name, r in results.items():
        own = {int(c): v for c, v in r["own_image_by_count"].items()}
        big = [own[c] for c in (8, 16, 32) if c in own]
        eight = f"  8+ {np.mean(big):.3f}" if big else ""
        lines.append(f"{name:<8s} {'':5s}  " + "  ".join(f"{own.get(c, 0):.3f} " for c in COUNTS) + eight)
    a, b, c = (results[k] for k in ("A", "B", "C"))
    lines.append(
        f"replication A={a['replication_8plus']:.4f} B={b['replication_8plus']:.4f} C={c['replication_8plus']:.4f} "
        f"quality_C_over_A={c['heldout_loss'] / a['heldout_loss']:.4f}"
    )
    return "\n".join(lines)


def run_setting(name: str, args, lab: str) -> dict:
    """Train and evaluate one setting -> its result (also written to OUT/setting-NAME.json)."""
    from pipeline.lab import save_model
    from transforms.clip_tokenizer import clip_tokenizer, write_clip_tokenizer_files

    truth = json.load(open(os.path.join(lab, "truth.json")))
    samples = read_shards(os.path.join(lab, "shards"))
    raw = sorted(samples)
    memsieve = run_memsieve(os.path.join(lab, "shards"), os.path.join(args.out, "memsieve"))
    pool = np.stack([pixels(samples[k]["image"]) for k in raw])
    pool_unit, pool_ids = centred_unit(pool), [truth["keys"][k]["image_id"] for k in raw]
    held_imgs = np.load(os.path.join(lab, "heldout.npz"))["images"]
    held = {"images": np.stack([pixels(im) for im in held_imgs]), "captions": truth["heldout_captions"]}
    tau = float(np.quantile(nearest(held["images"], pool_unit)[0], 0.99))
    tokenizer = clip_tokenizer(write_clip_tokenizer_files(os.path.join(args.out, f"tokenizer-{name}")))
    plan = {"A": (raw, None), "B": (exact_dedup(samples), None), "C": (memsieve["keep"], memsieve["alternatives"])}
    keys, alts = plan[name]
    unet, text, info = train_setting(name, keys, samples, tokenizer, args, alts, memsieve["p"], memsieve["sigma"])
    if name == "A":  # the harder lab's model, for the probe table (scripts/lab_eval.py --lab-set)
        save_model(os.path.join(args.out, "model_A"), unet, text, tokenizer)
    result = {**evaluate(unet, text, tokenizer, truth, pool_unit, pool_ids, tau, held, args), **info, "tau": tau}
    result["memsieve_kept"] = len(memsieve["keep"]) if name == "C" else None
    with open(os.path.join(args.out, f"setting-{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    log.info("%s: %s", name, json.dumps(result))
    return result


def _children(names: list[str], argv: list[str]) -> None:
    """--parallel: one single-threaded process per setting (3 settings on 2 cores)."""
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--settings", n, "--threads", "1"])
        for n in names
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a setting failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "mitigation"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=4, help="generations per caption")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--singles", type=int, default=360)
    parser.add_argument("--settings", default="A,B,C")
    parser.add_argument("--parallel", action="store_true", help="one process per setting, 1 thread each")
    parser.add_argument("--report", action="store_true", help="only print the table of OUT/setting-*.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from scripts.make_lab_set import make_lab_set

    torch.set_num_threads(args.threads)
    started = time.time()
    lab = os.path.join(args.out, "lab-set")
    if not os.path.isfile(os.path.join(lab, "truth.json")):
        log.info("lab set: %s", make_lab_set(lab, singles=args.singles))
    names = args.settings.split(",")
    if args.report:
        results = {n: json.load(open(os.path.join(args.out, f"setting-{n}.json"))) for n in names}
    elif args.parallel:
        run_memsieve(os.path.join(lab, "shards"), os.path.join(args.out, "memsieve"))
        rest = [a for a in argv if a != "--parallel"]
        _children(names, [a for i, a in enumerate(rest) if a != "--settings" and rest[i - 1 : i] != ["--settings"]])
        results = {n: json.load(open(os.path.join(args.out, f"setting-{n}.json"))) for n in names}
    else:
        results = {n: run_setting(n, args, lab) for n in names}
    if set(results) < {"A", "B", "C"}:
        return 0
    tau = results["A"]["tau"]
    out = table(results, tau, {n: r["items"] for n, r in results.items()})
    per = ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in results.items())
    wall = "" if args.report else f", {time.time() - started:.0f} s in all"
    timing = f"(steps {args.steps}, batch {args.batch}, {args.seeds} seeds; training {per}{wall})"
    lines = out.splitlines()
    text_out = "\n".join([*lines[:-1], timing, lines[-1]])  # the acceptance line stays last
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"tau": tau, "results": results, "args": vars(args)}, f, indent=1)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(text_out + "\n")
    print(text_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
