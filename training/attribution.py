"""Write weights/ATTRIBUTION.md: the licence and attribution of every audio file the shipped
models were trained on (CC BY needs attribution wherever weights trained on it ship).

    python3 training/attribution.py ../shared/data > weights/ATTRIBUTION.md
"""

import collections
import csv
import pathlib
import sys


def main(root):
    root = pathlib.Path(root)
    rows = list(csv.DictReader(open(root / "noise" / "extra" / "manifest.csv", newline="")))
    out = ["# Training data: sources, licences, attribution", "",
           "The shipped weights were trained on mixtures of the audio below (`../shared/data` of the",
           "repository; `npdgru.train.data`). Test audio (`testset/`, `testset_ood/`, `noise/test/`)",
           "was never used for training or model selection.", "",
           "## Speech", "",
           "- speechocean762 (Junbo Zhang et al., 2021; OpenSLR SLR101), `speech/train` and `speech/val`: CC BY 4.0.", "",
           "## Noise: `noise/train`", "",
           "- Speech Commands v0.02 `_background_noise_` (Pete Warden, Google, 2018): doing_the_dishes, dude_miaowing,",
           "  exercise_bike, running_tap, pink_noise, white_noise (first 75 % of each recording): CC BY 4.0.", "",
           "## Noise and room impulse responses: `noise/extra`", "",
           "Licence counts: " + ", ".join(f"{k}: {v}" for k, v in collections.Counter(r["licence"] for r in rows).most_common()) + ".",
           "Full licence texts of the packs: `noise/extra/licences/` of the corpus.", "",
           "| file | type | licence | attribution | source (repository @ commit: path) |", "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        out.append(f"| {cell(r['file'])} | {cell(r['type'])} | {cell(r['licence'])} | {cell(r['attribution'])} | "
                   f"{cell(r['repo'])} @ {r['commit'][:10]}: {cell(r['repo_path'])} |")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
