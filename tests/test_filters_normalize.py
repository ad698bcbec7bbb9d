"""Text normalisation: cc_net's rules, one line for fastText, clean lines for KenLM."""
from __future__ import annotations

import unicodedata

from filters.normalize import normalize_lines, normalize_text, normalize_texts


def test_cc_net_rules():
    assert normalize_text("Héllo Wörld ÀÉÎÕÜ çñ") == "hello world aeiou cn"
    assert normalize_text("Call 555-1234 in 2024, ٣ items, １２") == "call 000-0000 in 0000, 0 items, 00"
    assert normalize_text("It’s “quoted” «here» — and – this… ｆｕｌｌ，ｗｉｄｔｈ！") == \
        "it's \"quoted\" \"here\" - and - this... full,width!"
    # control and zero-width characters vanish; Unicode spaces become spaces
    assert normalize_text("a\x00b\x07c\u200bd\u00ade\x85f") == "abcdef"
    assert normalize_text("no\u00a0break\u2009thin\u3000wide") == "no break thin wide"
    # already decomposed accents (base letter + combining mark) are stripped too
    assert normalize_text(unicodedata.normalize("NFD", "Ångström")) == "angstrom"
    assert normalize_text("Москва́ Αθήνα") == "москва αθηνα"


def test_words_on_adjacent_lines_never_glue():
    text = "first line\nsecond\tline\r\nthird\x0bfourth\x0cfifth"
    assert normalize_text(text).split() == ["first", "line", "second", "line", "third", "fourth", "fifth"]
    assert "\n" not in normalize_text(text)


def test_lines_for_kenlm_are_stripped_and_non_empty():
    assert normalize_lines("  One Line \n\n\r\n  \nTwo  Lines 42\n") == ["one line", "two  lines 00"]
    assert normalize_lines("\n \n") == []


def test_batch_equals_one_by_one_and_is_valid_utf8():
    texts = ["Plain ASCII 123", "Ünïcödé ‘text’\n2nd line", "", "\ud800lone surrogate", "ℌello ﬁne"]
    out = normalize_texts(texts)
    assert out == [normalize_text(t) for t in texts]
    for s in out:
        s.encode("utf-8")              # no lone surrogates left: fastText needs valid UTF-8
    assert out[3] == "lone surrogate"
    assert out[4] == "hello fine"
