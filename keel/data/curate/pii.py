"""PII scrubbing with Presidio's pattern recognizers, without a spaCy model: typed placeholders such as ``<EMAIL>``.

The analyzer runs on Presidio's no-op NLP engine with only recognizers that need no NER model (regular expressions
with checksums: Luhn for credit cards, the IBAN check digits; phone numbers through `phonenumbers`). PERSON,
LOCATION, ORGANIZATION and other named entities need an NER model that keel does not have offline, so they are
NOT scrubbed. The e-mail recognizer's domain check uses tldextract's bundled suffix list (no download).
"""

from __future__ import annotations

import functools
import re

from keel.recipe.curate import PII_TYPES

PLACEHOLDERS = {
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "URL": "<URL>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IBAN_CODE": "<IBAN>",
    "CRYPTO": "<CRYPTO_WALLET>",
    "US_SSN": "<US_SSN>",
    "MAC_ADDRESS": "<MAC_ADDRESS>",
}
NOT_SCRUBBED = ("PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME")  # need an NER model

# Every recognizer above needs a digit, '@', '.' or ':' in the text: texts without one are skipped unread.
_MAY_HOLD_PII = re.compile(r"[\d@.:]")


@functools.cache
def _engines():
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        MacAddressRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        UsSsnRecognizer,
    )
    from presidio_anonymizer import AnonymizerEngine

    offline = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())  # the suffix list shipped in the package

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline(pattern_text).fqdn != ""

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (
        OfflineEmailRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        IpRecognizer,
        CreditCardRecognizer,
        IbanRecognizer,
        CryptoRecognizer,
        UsSsnRecognizer,
        MacAddressRecognizer,
    ):
        registry.add_recognizer(recognizer())
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])
    return analyzer, AnonymizerEngine()


def scrub(texts: list[str], cfg) -> tuple[list[str], dict[str, int], list[int]]:
    """(scrubbed texts, replacements per entity type, positions of the texts that changed); ``cfg``: a PiiConfig."""
    from presidio_anonymizer.entities import OperatorConfig

    entities = list(cfg.entities or PII_TYPES)
    analyzer, anonymizer = _engines()
    operators = {e: OperatorConfig("replace", {"new_value": PLACEHOLDERS[e]}) for e in entities}
    counts = dict.fromkeys(entities, 0)
    out, changed = [], []
    for i, text in enumerate(texts):
        if not _MAY_HOLD_PII.search(text):
            out.append(text)
            continue
        found = analyzer.analyze(text, language="en", entities=entities, score_threshold=cfg.min_score)
        if not found:
            out.append(text)
            continue
        result = anonymizer.anonymize(text, found, operators=operators)
        for item in result.items:
            counts[item.entity_type] += 1
        out.append(result.text)
        changed.append(i)
    return out, counts, changed
