"""A compact Ogg/Opus copy of the training part of the corpus, for training on a remote GPU.

    python3 training/make_opus_corpus.py ../shared/data .dev/data

Copies speech/train, speech/val, noise/train, noise/extra/train (Opus, about 21 and 25 kbit/s)
and noise/extra/rir (FLAC, unchanged); never the test folders. The sampler
(``npdgru.train.data``) reads .ogg files as it reads .flac ones. Opus keeps the lengths exactly;
its coding noise stays far below the mixtures' noise (and clean and noisy are made from the same
decoded speech, so the target stays consistent with the input).
"""

import pathlib
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor

import soundfile as sf

FOLDERS = {"speech/train": 0.95, "speech/val": 0.95, "noise/train": 0.93, "noise/extra/train": 0.93}


def _one(job):
    src, dst, level = job
    x, sr = sf.read(src, dtype="float32")
    sf.write(dst, x, sr, format="OGG", subtype="OPUS", compression_level=level)


def main(src_root, dst_root, workers=2):
    src_root, dst_root = pathlib.Path(src_root), pathlib.Path(dst_root)
    jobs = []
    for folder, level in FOLDERS.items():
        (dst_root / folder).mkdir(parents=True, exist_ok=True)
        for f in sorted((src_root / folder).glob("*.flac")):
            out = dst_root / folder / (f.stem + ".ogg")
            if not out.exists():
                jobs.append((f, out, level))
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_one, jobs, chunksize=16))
    shutil.copytree(src_root / "noise/extra/rir", dst_root / "noise/extra/rir", dirs_exist_ok=True)
    print(f"{len(jobs)} files written under {dst_root}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
