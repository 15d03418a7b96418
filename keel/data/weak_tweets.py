"""Built-in demo labelling functions for the tweets-sentiment data set (negative / neutral / positive).

Each function looks at one cue and returns a label or None (abstain). They are deliberately simple, as a
person's first labelling functions are; `keel run` on the weak-tweets recipe scores each against the real labels.
"""

import re

_POSITIVE = re.compile(
    r"\b(love|loving|great|awesome|amazing|excited|exciting|cool|best|happy|fun|wow|thanks|thank you|"
    r"congrats|beautiful|perfect|nice|yay|win|wins|incredible|brilliant|can't wait)\b",
    re.I,
)
_NEGATIVE = re.compile(
    r"\b(hate|worst|terrible|awful|scary|afraid|fail|fails|failed|crash|crashes|kill|killed|sucks|dangerous|"
    r"disaster|stupid|angry|worried|sad|broken|delayed|cancelled|lost|never|cheat|cheating|cheated|scandal|liar|"
    r"lies|ridiculous|annoying|worse|problem)\b",
    re.I,
)
_SMILE = re.compile(r"(:\)|:-\)|:D|<3|😀|😊|😍|👍)")
_FROWN = re.compile(r"(:\(|:-\(|:'\(|😠|😡|😢|👎)")
_URL = re.compile(r"https?://")


def lf_positive_word(text):
    return "positive" if _POSITIVE.search(text) else None


def lf_negative_word(text):
    return "negative" if _NEGATIVE.search(text) else None


def lf_smiley(text):
    return "positive" if _SMILE.search(text) else None


def lf_frown(text):
    return "negative" if _FROWN.search(text) else None


def lf_link_no_opinion(text):
    # a shared link with no opinion word reads as news
    if _URL.search(text) and not _POSITIVE.search(text) and not _NEGATIVE.search(text):
        return "neutral"
    return None


def lf_question(text):
    return "neutral" if text.rstrip().endswith("?") and not _NEGATIVE.search(text) else None


def lf_exclaimed_praise(text):
    return "positive" if "!" in text and _POSITIVE.search(text) and not _NEGATIVE.search(text) else None


def lf_retweet_no_opinion(text):
    if text.startswith("RT @") and not _POSITIVE.search(text) and not _NEGATIVE.search(text):
        return "neutral"
    return None
