"""A real CLIP BPE tokenizer, offline: vocab.json + merges.txt built from the BPE table that
ships inside open_clip (``open_clip.tokenizer.default_bpe()``), loaded as transformers'
``CLIPTokenizer``. transformers 5 silently builds a 2-token CLIPTokenizer when the vocabulary is
missing, so callers check the size (49408)."""

from __future__ import annotations

import gzip
import json
import os

CLIP_VOCAB_SIZE = 49408


def write_clip_tokenizer_files(folder: str) -> str:
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(folder: str, max_length: int = 77):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    if len(tok) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok
