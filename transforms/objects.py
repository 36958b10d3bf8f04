"""Object tags per image: from upstream metadata (``objects`` in the sample json) or CLIP
zero-shot over a vocabulary, calibrated per object; and whether an object is *related* to a
keyword (implicit intended) or not (unintended), methods.md section 1.
"""

from __future__ import annotations

import json

import numpy as np

DEFAULT_OBJECTS = (
    "flag",
    "logo",
    "watermark",
    "text",
    "face",
    "person",
    "car",
    "tree",
    "building",
    "sign",
    "dog",
    "cat",
    "horse",
    "bird",
    "flower",
    "cup",
    "bottle",
    "book",
    "chair",
    "table",
    "phone",
    "computer",
    "clock",
    "mountain",
    "sky",
    "water",
    "beach",
    "road",
    "boat",
    "airplane",
    "minaret",
    "dome",
    "frame",
    "border",
)
PROMPT = "a photo of a {}"

# keyword -> objects a concept implies (a small default allow-list; extend it in the job config)
DEFAULT_RELATED = (
    "mosque:minaret",
    "mosque:dome",
    "coffee:cup",
    "espresso:cup",
    "tea:cup",
    "beach:water",
    "sea:water",
    "ocean:water",
    "street:road",
    "street:car",
    "city:building",
    "garden:flower",
    "cafe:cup",
    "bar:bottle",
    "wine:bottle",
    "beer:bottle",
    "office:computer",
    "library:book",
    "dog:dog",
    "cat:cat",
    "portrait:face",
    "selfie:face",
    "poster:text",
    "quote:text",
    "meme:text",
    "sign:text",
)


def metadata_objects(meta_json: str) -> list[str]:
    """The sample json's ``objects`` list (names lower-cased), or [] when absent or malformed.
    A json without the word ``objects`` (nor an escape that could spell it) is not parsed."""
    if not meta_json or ("objects" not in meta_json and "\\u" not in meta_json):
        return []
    try:
        objects = json.loads(meta_json or "{}").get("objects")
    except (ValueError, AttributeError):
        return []
    if not isinstance(objects, list):
        return []
    return sorted({str(o).strip().lower() for o in objects if isinstance(o, str | int) and str(o).strip()})


def calibrate(scores: np.ndarray, z: float = 3.0, min_score: float = 0.2) -> np.ndarray:
    """Per-object thresholds from the run's own score distribution: mean + z * std, at least
    min_score. CLIP cosines differ by object ("text" scores high everywhere), so one global
    cut would tag some objects on every image and others on none."""
    mean, std = scores.mean(axis=0), scores.std(axis=0)
    return np.maximum(mean + z * std, min_score)


def zero_shot_tags(image_emb: np.ndarray, text_emb: np.ndarray, names: list[str], thresholds: np.ndarray):
    """image_emb (n, d), text_emb (k, d), both L2-normalized -> the names above threshold per image."""
    scores = image_emb @ text_emb.T
    return [[names[j] for j in np.nonzero(row >= thresholds)[0]] for row in scores]


def related_fn(allow: tuple[str, ...] | list[str], text_embed=None, threshold: float = 0.8):
    """-> related(keyword, object) -> bool: allow-list ``keyword:object`` entries, or (when a
    text embedder is given, e.g. CLIP's text tower) cosine of the two words >= threshold."""
    pairs = {tuple(p.split(":", 1)) for p in allow if ":" in p}
    cache: dict[tuple[str, str], bool] = {}

    def related(keyword: str, obj: str) -> bool:
        if keyword == obj or (keyword, obj) in pairs:
            return True
        if text_embed is None:
            return False
        if (keyword, obj) not in cache:
            a, b = text_embed([keyword, obj])
            cache[(keyword, obj)] = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) >= threshold
        return cache[(keyword, obj)]

    return related
