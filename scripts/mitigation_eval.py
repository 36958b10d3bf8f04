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
Then it samples (DDIM 50 steps, guidance 3) from the training captions of every repeated image,
24 singletons and 64 held-out captions (never trained), one sample per seed, and counts
replications: a generation whose nearest raw training image (centred pixel cosine at 16x16) is
the caption's own image (any copy of it) and closer than the chance level, the 99th percentile
of the similarity of unrelated pairs (a generation and a training image its caption does not
belong to; all settings pooled). The table also gives the rule at a stricter level (the 99th
percentile of the nearest-image similarity of the never-trained captions' generations), the
any-image rate (chance matches count) and the rule's chance rate (each prompt credited with
another prompt's image).
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
HELDOUT_GENERATED = 64  # never-trained captions generated per seed (the strict chance level)
BINS = np.linspace(-1.0, 1.0, 401)  # histogram of unrelated-pair similarities (the chance level)


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
    """(image_id, count, caption): every repeated image, the first singletons, and HELDOUT_GENERATED
    held-out captions (count 0, no image: never trained, they calibrate the chance level)."""
    rows = [(i, v["count"], v["caption"]) for i, v in sorted(truth["images"].items()) if v["count"] >= 2]
    singles = [(i, 1, v["caption"]) for i, v in sorted(truth["images"].items()) if v["kind"] == "single"]
    held = [("", 0, c) for c in truth["heldout_captions"][:HELDOUT_GENERATED]]
    return rows + singles[:SINGLES_GENERATED] + held


def evaluate(unet, text, tokenizer, truth, pool_unit, pool_ids, held, args) -> dict:
    """Generate from the prompts (one sample per seed) -> per generation: the prompt's count, its
    nearest raw training image's similarity and image id, and the best similarity to its own image
    (any copy); plus the held-out loss. The replication rule is applied later (``rates``), on the
    generations of all settings together."""
    import torch
    from diffusers import DDIMScheduler

    from pipeline.lab import generate, heldout_loss, noise_scheduler, tokenize
    from transforms.probe import ProbeModel

    sched = DDIMScheduler.from_config(noise_scheduler().config)
    pm = ProbeModel(unet, text, tokenizer, sched, "cpu", torch.float32, "lab")
    rows, ids = prompts(truth), np.asarray(pool_ids)
    images = sorted(set(pool_ids))
    copies = np.stack([ids == i for i in images])  # distinct image x raw sample
    gens, unrelated = [], np.zeros(len(BINS) - 1, dtype=np.int64)
    for seed in range(args.seeds):
        gen = np.concatenate(
            [generate(pm, [r[2] for r in rows[i : i + 64]], seed=seed) for i in range(0, len(rows), 64)]
        )
        sims = centred_unit(gen) @ pool_unit.T
        per_image = np.stack([np.where(copies[k], sims, -1.0).max(1) for k in range(len(images))], 1)
        for (img_id, count, _), s, p in zip(rows, sims, per_image, strict=True):
            j = int(s.argmax())
            own = float(s[ids == img_id].max()) if img_id else float("nan")
            gens.append({"image": img_id, "count": count, "seed": seed, "sim": float(s[j]), "nn": ids[j], "own": own})
            unrelated += np.histogram([v for i, v in zip(images, p, strict=True) if i != img_id], BINS)[0]
    loss = heldout_loss(unet, text, held["images"], tokenize(tokenizer, held["captions"]))
    return {"generations": gens, "unrelated_hist": unrelated.tolist(), "heldout_loss": loss}


def threshold(results: dict, q: float = 0.99) -> float:
    """The chance level of one (generation, training image) pair: the q quantile of the similarity
    of every generation to every training image its caption does not belong to (an image's
    similarity: its closest copy), pooled over the settings."""
    hist = np.sum([r["unrelated_hist"] for r in results.values()], axis=0)
    return float(BINS[1:][np.searchsorted(np.cumsum(hist), q * hist.sum())])


def strict_threshold(results: dict) -> float:
    """A stricter chance level: the 99th percentile of the *nearest*-training-image similarity of
    generations from never-trained captions (these match the often-repeated images too: what
    the model makes for any in-domain caption), pooled over the settings."""
    sims = [g["sim"] for r in results.values() for g in r["generations"] if g["count"] == 0]
    return float(np.quantile(sims, 0.99))


def rates(gens: list[dict], tau: float, shuffle_seed: int = 0) -> dict:
    """Replication rates by duplication count for one setting's generations.

    own: the nearest raw training image is the prompt's own image (any copy of it) and closer
    than tau (the replication rule). any: the nearest raw training image, whichever, is closer
    than tau (the issue's literal rule; chance matches count). chance: the own rule with the
    prompts' images shuffled (each prompt credited with another prompt's image): how often the
    own rule fires for an image the caption does not belong to."""
    trained = [g for g in gens if g["count"] > 0]
    images = sorted({g["image"] for g in trained})
    perm = np.random.default_rng(shuffle_seed).permutation(len(images))
    while len(images) > 1 and (perm == np.arange(len(images))).any():  # a derangement: nobody keeps its own
        perm = np.random.default_rng(shuffle_seed := shuffle_seed + 1).permutation(len(images))
    other = {img: images[k] for img, k in zip(images, perm, strict=True)}
    out: dict[str, dict] = {"own": {}, "any": {}, "chance": {}}
    for c in COUNTS:
        mine = [g for g in trained if g["count"] == c]
        if not mine:
            continue
        out["own"][c] = float(np.mean([g["sim"] > tau and g["nn"] == g["image"] for g in mine]))
        out["any"][c] = float(np.mean([g["sim"] > tau for g in mine]))
        out["chance"][c] = float(np.mean([g["sim"] > tau and g["nn"] == other[g["image"]] for g in mine]))
    big = [g for g in trained if g["count"] >= 8]
    out["own_8plus"] = float(np.mean([g["sim"] > tau and g["nn"] == g["image"] for g in big]))
    out["any_8plus"] = float(np.mean([g["sim"] > tau for g in big]))
    out["chance_8plus"] = float(np.mean([g["sim"] > tau and g["nn"] == other[g["image"]] for g in big]))
    held = [g for g in gens if g["count"] == 0]
    out["heldout_any"] = float(np.mean([g["sim"] > tau for g in held])) if held else float("nan")
    return out


def _row(name: str, items, by: dict, tail: str) -> str:
    cells = "  ".join(f"{by[c]:.3f} " if c in by else "  -    " for c in COUNTS)
    return f"{name:<8s} {items:>5}  {cells}  {tail}"


def table(results: dict, sizes: dict, tau: float | None = None, strict: float | None = None) -> str:
    """The replication table (own-image rule at the pair chance level, at the strict level, the
    any-image rule and the own rule's chance rate) and the acceptance line last."""
    tau = threshold(results) if tau is None else tau
    strict = strict_threshold(results) if strict is None else strict
    r = {n: rates(res["generations"], tau) for n, res in results.items()}
    rs = {n: rates(res["generations"], strict) for n, res in results.items()}
    head = "setting  items  " + "  ".join(f"x{c:<5d}" for c in COUNTS) + "  8+     heldout_loss"
    lines = [
        f"replication: the nearest raw training image is the caption's own image (any copy), closer "
        f"(centred pixel cosine at 16x16) than {tau:.3f}, the 99th pct of unrelated (generation, "
        "training image) pairs, all settings:",
        head,
    ]
    for n, res in results.items():
        lines.append(_row(n, sizes[n], r[n]["own"], f"{r[n]['own_8plus']:.3f}  {res['heldout_loss']:.5f}"))
    lines.append(
        f"the same rule at the strict level {strict:.3f} (99th pct of the nearest-image similarity of "
        "generations from never-trained captions):"
    )
    for n in results:
        lines.append(_row(n, "", rs[n]["own"], f"{rs[n]['own_8plus']:.3f}"))
    lines.append(f"any training image above {tau:.3f} (chance matches count; never-trained captions' rate last):")
    for n in results:
        lines.append(_row(n, "", r[n]["any"], f"{r[n]['any_8plus']:.3f}  never-trained {r[n]['heldout_any']:.3f}"))
    lines.append("chance rate of the rule (each prompt credited with another prompt's image):")
    for n in results:
        lines.append(_row(n, "", r[n]["chance"], f"{r[n]['chance_8plus']:.3f}"))
    a, b, c = (r[k]["own_8plus"] for k in ("A", "B", "C"))
    ratio = results["C"]["heldout_loss"] / results["A"]["heldout_loss"]
    lines.append(f"replication A={a:.4f} B={b:.4f} C={c:.4f} quality_C_over_A={ratio:.4f}")
    return "\n".join(lines)


def kept_per_image(keys: list[str], truth: dict) -> dict:
    """Duplication count -> {samples kept per image: images}: how a setting's dedup matched the
    lab's ground truth (memsieve: one per planted image when every copy joined its cluster)."""
    kept = {i: 0 for i in truth["images"]}
    for k in keys:
        kept[truth["keys"][k]["image_id"]] += 1
    out: dict[int, dict[int, int]] = {}
    for img, n in kept.items():
        by = out.setdefault(truth["images"][img]["count"], {})
        by[n] = by.get(n, 0) + 1
    return out


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
    tokenizer = clip_tokenizer(write_clip_tokenizer_files(os.path.join(args.out, f"tokenizer-{name}")))
    plan = {"A": (raw, None), "B": (exact_dedup(samples), None), "C": (memsieve["keep"], memsieve["alternatives"])}
    keys, alts = plan[name]
    unet, text, info = train_setting(name, keys, samples, tokenizer, args, alts, memsieve["p"], memsieve["sigma"])
    if name == "A":  # the harder lab's model, for the probe table (scripts/lab_eval.py --lab-set)
        save_model(os.path.join(args.out, "model_A"), unet, text, tokenizer)
    started = time.time()
    result = {**evaluate(unet, text, tokenizer, truth, pool_unit, pool_ids, held, args), **info}
    result["eval_seconds"] = round(time.time() - started, 1)
    result["kept_per_image"] = kept_per_image(keys, truth)
    with open(os.path.join(args.out, f"setting-{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    log.info(
        "%s: %s", name, json.dumps({k: v for k, v in result.items() if k not in ("generations", "unrelated_hist")})
    )
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
    tau = threshold(results)
    out = table(results, {n: r["items"] for n, r in results.items()}, tau)
    per = ", ".join(f"{n} {r['seconds']:.0f}+{r.get('eval_seconds', 0):.0f} s" for n, r in results.items())
    wall = "" if args.report else f", {time.time() - started:.0f} s in all, load average {os.getloadavg()[1]:.1f}"
    timing = f"(steps {args.steps}, batch {args.batch}, {args.seeds} seeds; train+eval {per}{wall})"
    kept = f"memsieve kept per image (count: {{kept: images}}): {results['C'].get('kept_per_image')}"
    lines = out.splitlines()
    text_out = "\n".join([*lines[:-1], kept, timing, lines[-1]])  # the acceptance line stays last
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"tau": tau, "results": results, "args": vars(args)}, f, indent=1)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(text_out + "\n")
    print(text_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
