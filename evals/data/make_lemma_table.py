"""Regenerate ``chair/wordnet_lemmas.json``: the part of NLTK's WordNet lemmatiser that CHAIR can observe.

CHAIR only looks at a lemma when it is a CHAIR word (a synonym or a word of a pair rule). NLTK's lemmatiser
returns the shortest of ``wordnet._morphy(form, pos)``, and one ``_morphy`` step either looks the form up in the
exception lists or strips one suffix, so every form whose lemma can be a CHAIR word is a CHAIR word, an exception
entry of one, or a CHAIR word with one suffix rule undone. This script enumerates those forms, lemmatises them with
the real NLTK + WordNet 3.0 and keeps each (pos, form) whose lemma differs from the form and where form or lemma
is a CHAIR word. With the table, the offline pipeline gives the same CHAIR words as NLTK for any tagged token.

Run (needs nltk and WordNet 3.0, e.g. ``NLTK_DATA`` as in docs/evals.md): ``python make_lemma_table.py OUT.json``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nltk.corpus import wordnet
from nltk.stem import WordNetLemmatizer

HERE = Path(__file__).parent


def chair_words() -> set[str]:
    tables = json.loads((HERE / "chair" / "chair_word_tables.json").read_text())
    words = {w for w in tables["inverse_synonym_dict"] if w and " " not in w}
    words |= {part for pair in tables["double_word_dict"] for part in pair.split()}
    return words


def main(out: str) -> None:
    words = chair_words()
    lemmatizer = WordNetLemmatizer()
    table: dict[str, dict[str, str]] = {}
    for pos in ("n", "v", "a", "r"):
        candidates = set(words)
        for form, bases in wordnet._exception_map[pos].items():
            if words.intersection(bases):
                candidates.add(form)
        for word in words:
            for old, new in wordnet.MORPHOLOGICAL_SUBSTITUTIONS[pos]:
                if word.endswith(new):
                    candidates.add(word[: len(word) - len(new)] + old)
        table[pos] = {}
        for form in sorted(candidates):
            lemma = lemmatizer.lemmatize(form, pos)
            if lemma != form and (lemma in words or form in words):
                table[pos][form] = lemma
    Path(out).write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
