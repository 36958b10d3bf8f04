"""Caption keywords with spaCy: ``blank("en")`` tokenizer + the lookup lemmatizer, offline.

Lower-case lemmas, stop words, punctuation and numbers out; optional bigrams of adjacent
kept lemmas. The lemma table comes from spacy-lookups-data. spaCy tokenizes each
whitespace-separated piece on its own, so a piece's kept lemmas are computed once (spaCy's
tokenizer and the lookup) and cached: a caption then costs a split and dict lookups.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w\s]")
_DIGITS = re.compile(r"\d+")
PIECE_CACHE = 500_000  # distinct whitespace-separated pieces whose lemmas are kept (~250 B each)
CAPTION_CACHE = 100_000  # distinct captions whose terms are kept


class KeywordExtractor:
    """Picklable; the spaCy pipeline is built lazily in each worker process."""

    def __init__(self, bigrams: bool = False):
        self.bigrams = bigrams
        self._nlp = None

    def _load(self):
        import spacy

        nlp = spacy.blank("en")
        lemmatizer = nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        nlp.initialize()
        table = lemmatizer.lookups.get_table("lemma_lookup")
        self._nlp = nlp
        self._table = table
        self._stop = frozenset(nlp.Defaults.stop_words)
        self._cache: dict[int, str | None] = {}
        self._pieces: dict[str, tuple[str, ...]] = {}
        self._terms: dict[str, tuple[str, ...]] = {}

    def __getstate__(self):
        return {"bigrams": self.bigrams, "_nlp": None}

    def _lemma(self, token) -> str | None:
        cached = self._cache.get(token.lower, "")  # keyed by the lexeme's hash: no string built
        if cached != "":
            return cached
        low = token.lower_
        lemma = None
        if token.is_alpha and len(low) > 1 and low not in self._stop:
            lemma = self._table.get(low, low)
            if lemma in self._stop:
                lemma = None
        if len(self._cache) < 500_000:
            self._cache[token.lower] = lemma
        return lemma

    def lemmas(self, text: str) -> list[str]:
        """Kept lemmas in order (duplicates kept). spaCy's tokenizer splits the text at
        whitespace first and tokenizes each piece on its own (prefixes, suffixes, infixes,
        special cases), so the kept lemmas of each distinct piece are computed once by spaCy
        and cached; ``lemmas_spacy`` is the per-caption reference."""
        if self._nlp is None:
            self._load()
        pieces = self._pieces
        out: list[str] = []
        for piece in text.split():
            kept = pieces.get(piece)
            out.extend(self._piece(piece) if kept is None else kept)
        return out

    def _piece(self, piece: str) -> tuple[str, ...]:
        """The kept lemmas of one whitespace-free piece (spaCy's tokenizer, then cached); an
        empty piece (Arrow's split at leading or trailing whitespace) has none."""
        kept = self._pieces.get(piece)
        if kept is None and not piece:
            return ()
        if kept is None:
            kept = tuple(lem for t in self._nlp.tokenizer(piece) if (lem := self._lemma(t)) is not None)
            if len(self._pieces) < PIECE_CACHE:
                self._pieces[piece] = kept
        return kept

    def batch_terms(self, captions, texts: list[str] | None = None):
        """``trigger_records.term_columns([self.terms_tuple(c) for c in captions])`` for an Arrow
        string array: (sorted vocabulary, term ids (int32), row offsets (int64)). Arrow's
        whitespace split gives the pieces ``str.split`` gives (its Unicode split agrees with
        Python's on every code point; the ASCII one, faster, where the text is ASCII without
        \\x1c-\\x1f), plus empty pieces at leading and trailing whitespace, which have no lemmas;
        each distinct piece is looked up once (``_piece_entries``). With bigrams (adjacent
        lemmas across pieces) every caption goes through ``terms_tuple``. ``texts``: the
        captions as a list, when the caller has it."""
        import numpy as np
        import pyarrow as pa

        if self._nlp is None:
            self._load()
        captions = captions.combine_chunks() if isinstance(captions, pa.ChunkedArray) else captions
        n = len(captions)
        fast = np.full(n, not self.bigrams and captions.null_count == 0)
        index: dict[str, int] = {}
        rows, terms = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        if fast.any():
            got_rows, got_terms = self._piece_entries(captions.filter(pa.array(fast)), index)
            rows.append(np.flatnonzero(fast)[got_rows])
            terms.append(got_terms)
        slow = np.flatnonzero(~fast)
        if len(slow):
            texts = captions.take(pa.array(slow)).to_pylist() if texts is None else [texts[i] for i in slow.tolist()]
            got = [self.terms_tuple(t) for t in texts]
            rows.append(np.repeat(slow, [len(g) for g in got]))
            terms.append(np.array([index.setdefault(t, len(index)) for g in got for t in g], dtype=np.int64))
        vocab = sorted(index)
        rank = np.empty(len(vocab), dtype=np.int64)
        rank[[index[t] for t in vocab]] = np.arange(len(vocab))
        width = max(len(vocab), 1)
        codes = np.sort(np.concatenate(rows) * width + rank[np.concatenate(terms)])
        codes = codes[np.concatenate(([True], codes[1:] != codes[:-1]))] if len(codes) else codes
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(codes // width, minlength=n), out=off[1:])
        return tuple(vocab), (codes % width).astype(np.int32), off

    def _piece_entries(self, captions, index: dict[str, int]):
        """Captions split in Arrow -> (row, term id) of every kept lemma of every piece: each
        distinct piece's lemmas (``_piece``) get ids in ``index`` once."""
        import numpy as np
        import pyarrow.compute as pc

        lists = (pc.ascii_split_whitespace if _plain(captions) else pc.utf8_split_whitespace)(captions)
        encoded = pc.list_flatten(lists).dictionary_encode()
        kept = [[index.setdefault(t, len(index)) for t in self._piece(p)] for p in encoded.dictionary.to_pylist()]
        lens = np.array([len(k) for k in kept], dtype=np.int64)
        starts = np.zeros(len(kept), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        flat = np.array([t for k in kept for t in k], dtype=np.int64)
        piece = encoded.indices.to_numpy()
        per = lens[piece]
        first = np.repeat(starts[piece] - np.cumsum(per) + per, per)
        rows = np.repeat(pc.list_parent_indices(lists).to_numpy(), per)
        return rows, flat[first + np.arange(len(first))]

    def lemmas_spacy(self, text: str) -> list[str]:
        """Kept lemmas of the whole caption through spaCy's tokenizer (the reference path)."""
        if self._nlp is None:
            self._load()
        return [lem for t in self._nlp.tokenizer(text) if (lem := self._lemma(t)) is not None]

    def terms(self, text: str) -> list[str]:
        """Sorted unique keyword terms of one caption (lemmas, and bigrams when enabled)."""
        return list(self.terms_tuple(text))

    def terms_tuple(self, text: str) -> tuple[str, ...]:
        """``terms`` as a tuple, cached per distinct caption (captions repeat)."""
        if self._nlp is None:
            self._load()
        got = self._terms.get(text)
        if got is None:
            got = self._terms_of(self.lemmas(text))
            if len(self._terms) < CAPTION_CACHE:
                self._terms[text] = got
        return got

    def _terms_of(self, seq: list[str]) -> tuple[str, ...]:
        out = set(seq)
        if self.bigrams:
            out.update(f"{a} {b}" for a, b in zip(seq, seq[1:], strict=False))
        return tuple(sorted(out))

    def many(self, texts: list[str]) -> list[list[str]]:
        if self._nlp is None:
            self._load()
        return [self.terms(t) for t in texts]


def _plain(captions) -> bool:
    """Whether an Arrow string array's text is ASCII without \\x1c-\\x1f (where Arrow's ASCII
    whitespace split is Python's), read from its UTF-8 bytes at once."""
    import numpy as np
    import pyarrow as pa

    if len(captions) == 0:
        return True
    if captions.type not in (pa.string(), pa.large_string()):
        captions = captions.cast(pa.large_string())
    _, off_buf, data_buf = captions.buffers()
    if data_buf is None:
        return True
    width = np.int64 if captions.type == pa.large_string() else np.int32
    offsets = np.frombuffer(off_buf, width)
    data = np.frombuffer(data_buf, np.uint8)[offsets[captions.offset] : offsets[captions.offset + len(captions)]]
    return not ((data >= 0x80) | ((data >= 0x1C) & (data <= 0x1F))).any()


# ASCII characters that are neither word nor space (``_NON_WORD``) -> " ", for str.translate
_ASCII_NON_WORD = {c: " " for c in range(128) if _NON_WORD.match(chr(c))}


def normalize_caption(text: str) -> str:
    r"""Case, accents, punctuation and spacing folded: the key for exact caption duplicates.
    ``\s`` and ``str.split`` agree on whitespace, so runs of it fold by a split and a join; an
    ASCII caption is its own NFKC form and its non-word characters are a translate table."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII_NON_WORD).split())
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


def normalize_caption_reference(text: str) -> str:
    """``normalize_caption`` as regular expressions (the reference of the fast path)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NON_WORD.sub(" ", text)
    return _SPACE.sub(" ", text).strip()
