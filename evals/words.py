"""Caption -> lemmatised tokens, the word pipeline of the OPERA / lmms-eval CHAIR scorer (evals spec §1.4 steps 1-2).

Two pipelines give the same tokens:

* ``nltk``: lower-case, ``nltk.word_tokenize`` (punkt sentences when punkt is installed, else the sentence split
  below), ``nltk.pos_tag``, ``WordNetLemmatizer`` with the POS of the tag. Needs ``nltk`` and its WordNet data;
  the tagger comes from NLTK's data when installed, else from the copy shipped with vlmkit.
* ``offline``: no NLTK at all. The same steps re-implemented: NLTK's word-tokeniser regexes, NLTK's averaged
  perceptron tagger (the shipped weights), and a WordNet lemma table restricted to the forms CHAIR can observe
  (``data/make_lemma_table.py``), so CHAIR words come out as with NLTK. Sentences are split after ``.``, ``!`` or
  ``?`` (optionally followed by a closing quote or bracket) followed by whitespace; punkt splits these captions the
  same way.

The tokenizer regexes and the tagger's features follow NLTK 3.9 (``nltk.tokenize.destructive``,
``nltk.tag.perceptron``; Apache-2.0).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from functools import lru_cache
from typing import Protocol

from vlmkit.errors import ConfigError
from vlmkit.evals.files import data_file, read_json

PIPELINES = ("auto", "nltk", "offline")
TAGGER_FILE = "nltk/averaged_perceptron_tagger_eng.json.gz"
LEMMA_FILE = "chair/wordnet_lemmas.json"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


class WordPipeline(Protocol):
    name: str
    detail: str

    def lemmas(self, caption: str) -> list[str]:
        """The lower-cased, tokenised, lemmatised words of ``caption``."""


def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in SENTENCE_END.split(text)) if s]


def wordnet_pos(tag: str) -> str:
    """The WordNet POS OPERA's scorer lemmatises a Penn tag with (noun when the tag is none of J, V, N, R)."""
    return {"J": "a", "V": "v", "N": "n", "R": "r"}.get(tag[:1], "n")


class NltkPipeline:
    """The reference pipeline through NLTK itself."""

    name = "nltk"

    def __init__(self):
        try:
            import nltk
            from nltk.stem import WordNetLemmatizer
        except ImportError:
            raise ConfigError("the nltk CHAIR pipeline needs nltk: pip install nltk (or use --pipeline offline)") from None
        try:
            WordNetLemmatizer().lemmatize("dogs")
        except LookupError:
            raise ConfigError(
                "the nltk CHAIR pipeline needs WordNet: nltk.download('wordnet') or see docs/evals.md "
                "(or use --pipeline offline)"
            ) from None
        self._nltk = nltk
        self._lemmatizer = WordNetLemmatizer()
        self._tagger, tagger_source = _nltk_tagger(nltk)
        self._punkt = _has(nltk, "tokenizers/punkt_tab/english/")
        self._word_tokenizer = nltk.tokenize.NLTKWordTokenizer()
        sentences = "punkt_tab" if self._punkt else "regex sentence split"
        self.detail = f"nltk {nltk.__version__}; {sentences}; tagger from {tagger_source}; WordNet lemmatiser"

    def lemmas(self, caption: str) -> list[str]:
        text = caption.lower()
        if self._punkt:
            tokens = self._nltk.word_tokenize(text)
        else:
            tokens = [t for sentence in split_sentences(text) for t in self._word_tokenizer.tokenize(sentence)]
        return [self._lemmatizer.lemmatize(word, wordnet_pos(tag)) for word, tag in self._tagger.tag(tokens)]


def _has(nltk, resource: str) -> bool:
    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def _nltk_tagger(nltk):
    from nltk.tag.perceptron import PerceptronTagger

    if _has(nltk, "taggers/averaged_perceptron_tagger_eng/"):
        return PerceptronTagger(), "nltk_data"
    tagger = PerceptronTagger(load=False)
    weights, tagdict, classes = _tagger_tables()
    tagger.model.weights, tagger.tagdict, tagger.classes = weights, tagdict, set(classes)
    tagger.model.classes = tagger.classes
    return tagger, "vlmkit's copy"


@lru_cache(maxsize=1)
def _tagger_tables() -> tuple[dict, dict, list]:
    tables = read_json(data_file(TAGGER_FILE))
    return tables["weights"], tables["tagdict"], tables["classes"]


class OfflinePipeline:
    """The same tokens without NLTK (see the module docstring)."""

    name = "offline"
    detail = "offline: NLTK tokenizer regexes, averaged perceptron tagger (shipped weights), WordNet lemma table"

    def __init__(self):
        self._weights, self._tagdict, classes = _tagger_tables()
        self._classes = sorted(classes)
        self._lemma_table = json.loads(data_file(LEMMA_FILE).read_text())

    def lemmas(self, caption: str) -> list[str]:
        tokens = [t for sentence in split_sentences(caption.lower()) for t in tokenize(sentence)]
        return [self._lemma_table[wordnet_pos(tag)].get(word, word) for word, tag in zip(tokens, self.tag(tokens))]

    def tag(self, tokens: list[str]) -> list[str]:
        """Penn tags of ``tokens``, as NLTK's averaged perceptron tagger gives them."""
        context = ["-START-", "-START2-"] + [_normalize(t) for t in tokens] + ["-END-", "-END2-"]
        prev, prev2 = "-START-", "-START2-"
        tags = []
        for i, word in enumerate(tokens):
            tag = self._tagdict.get(word)
            if not tag:
                tag = self._predict(_features(i + 2, word, context, prev, prev2))
            tags.append(tag)
            prev2, prev = prev, tag
        return tags

    def _predict(self, features: list[str]) -> str:
        scores: dict[str, float] = defaultdict(float)
        for feature in features:
            for label, weight in self._weights.get(feature, {}).items():
                scores[label] += weight
        return max(self._classes, key=lambda label: (scores[label], label))


def _normalize(word: str) -> str:
    if "-" in word and word[0] != "-":
        return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
        return "!YEAR"
    if word and word[0].isdigit():
        return "!DIGITS"
    return word.lower()


def _features(i: int, word: str, context: list[str], prev: str, prev2: str) -> list[str]:
    """The tagger's features (each counted once; a repeated feature would count twice in NLTK, which happens only
    when two templates give the same string, and they never do because each starts with its own name)."""
    return [
        "bias",
        f"i suffix {word[-3:]}",
        f"i pref1 {word[0] if word else ''}",
        f"i-1 tag {prev}",
        f"i-2 tag {prev2}",
        f"i tag+i-2 tag {prev} {prev2}",
        f"i word {context[i]}",
        f"i-1 tag+i word {prev} {context[i]}",
        f"i-1 word {context[i - 1]}",
        f"i-1 suffix {context[i - 1][-3:]}",
        f"i-2 word {context[i - 2]}",
        f"i+1 word {context[i + 1]}",
        f"i+1 suffix {context[i + 1][-3:]}",
        f"i+2 word {context[i + 2]}",
    ]


_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b", r"(?i)\b(gon)(?#X)(na)\b",
    r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b", r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b",
)]


def tokenize(sentence: str) -> list[str]:
    """NLTK's ``NLTKWordTokenizer().tokenize`` (word tokens of one sentence)."""
    text = sentence.strip()
    for regexp, substitution in _STARTING_QUOTES + _PUNCTUATION + [_PARENS, _DOUBLE_DASHES]:
        text = regexp.sub(substitution, text)
    text = f" {text} "
    for regexp, substitution in _ENDING_QUOTES:
        text = regexp.sub(substitution, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def pipeline(name: str = "auto") -> WordPipeline:
    """``nltk``, ``offline``, or ``auto`` (nltk when nltk and WordNet are installed, else offline)."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown CHAIR word pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    if name == "offline":
        return OfflinePipeline()
    if name == "nltk":
        return NltkPipeline()
    try:
        return NltkPipeline()
    except ConfigError:
        return OfflinePipeline()
