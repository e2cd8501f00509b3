"""Speech from another corpus: a LibriSpeech subset for training and an "other voices" test set.

    python3 tools/librispeech_voices.py GIT_DIR [--out .cache/librispeech] [--data ../shared/data]

GIT_DIR is a clone (or bare mirror) of https://github.com/resemble-ai/Resemblyzer, which carries
351 LibriSpeech utterances (CC BY 4.0, V. Panayotov et al., "LibriSpeech: an ASR corpus based on
public domain audio books", ICASSP 2015; OpenSLR SLR12) in ``audio_data/``: one utterance of each
of 251 train-clean-100 speakers and ten of each of 10 test-other speakers. Only those two folders
are read, at the pinned commit below (the repository's other audio is not LibriSpeech). Written:

    OUT/speech/train/        the 251 train-clean-100 utterances (52 min, 16 kHz FLAC), for
                             ``npdgru train --extra-speech OUT/speech/train``
    OUT/testset_voices/      100 mixtures of the test-other utterances (10 speakers no training
                             folder holds, read audiobooks: another corpus, other voices and
                             microphones than speechocean762) with the noise of ``testset_ood`` (the
                             noise types no training folder holds), 20 at each SNR in
                             {-5, 0, 5, 10, 15} dB: clean/, noisy/, manifest.csv, for ``npdgru eval --data``
    OUT/LICENSE.TXT, OUT/SPEAKERS.TXT, OUT/README.md   the corpus licence, speaker list and provenance

The noise of each ``testset_ood`` pair is recovered as (noisy - clean) / (scale * noise_gain) (its
manifest's columns; exact up to PCM-16 rounding); the segments of one noise type are joined (each at unit RMS) into one
signal per type, and each test-other utterance (cut to its first 10 s) is mixed with a segment of
one type at a random offset (SNRs in turn, types in turn every five mixtures, a fixed seed). SNR is the ratio of the whole clean
signal's power to the noise's, as in ``testset_ood``; a mixture whose peak exceeds 0.9 is scaled
down, clean and noisy by the same factor. Nothing here is ever read by training: the test set is
for evaluation only, and training reads only OUT/speech/train when told to.

Kept out of git (about 80 MB); the pinned commit makes the files the same on every machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import pathlib
import subprocess
import sys

import numpy as np
import soundfile as sf

COMMIT = "15d828edebe06bc72b9cabc8ef8ca5ab2cb457ce"
REPO = "https://github.com/resemble-ai/Resemblyzer"
TRAIN_DIR = "audio_data/librispeech_train-clean-100"
TEST_DIR = "audio_data/librispeech_test-other"
SNRS = (-5, 0, 5, 10, 15)
MAX_SECONDS = 10.0
SEED = 2027


def _git(git_dir: pathlib.Path, *args: str) -> bytes:
    flag = "--git-dir" if (git_dir / "HEAD").is_file() and not (git_dir / ".git").exists() else "-C"
    return subprocess.run(["git", flag, str(git_dir), *args], check=True, capture_output=True).stdout


def _resolve_commit(git_dir: pathlib.Path) -> str:
    for ref in (COMMIT, "HEAD"):
        try:
            return _git(git_dir, "rev-parse", "--verify", "--quiet", ref + "^{commit}").decode().strip()
        except subprocess.CalledProcessError:
            continue
    raise SystemExit(f"{git_dir}: not a git repository with commit {COMMIT}")


def _files(git_dir, commit, folder, suffix=".flac"):
    names = _git(git_dir, "ls-tree", "-r", "--name-only", commit, folder).decode().splitlines()
    return sorted(n for n in names if n.endswith(suffix))


def _audio(git_dir, commit, path) -> np.ndarray:
    x, sr = sf.read(io.BytesIO(_git(git_dir, "show", f"{commit}:{path}")), dtype="float64", always_2d=True)
    if sr != 16000:
        raise SystemExit(f"{path}: {sr} Hz, expected 16000 (LibriSpeech is 16 kHz)")
    return x.mean(axis=1)


def _ood_noise_by_type(data: pathlib.Path) -> dict[str, np.ndarray]:
    """testset_ood's noise, recovered per pair and joined per type (each segment at unit RMS)."""
    root = data / "testset_ood"
    by_type: dict[str, list[np.ndarray]] = {}
    with open(root / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            clean, _ = sf.read(root / "clean" / f"{row['id']}.flac", dtype="float64")
            noisy, _ = sf.read(root / "noisy" / f"{row['id']}.flac", dtype="float64")
            noise = (noisy - clean) / (float(row["scale"]) * float(row["noise_gain"]))
            noise = noise / (np.sqrt(np.mean(noise**2)) + 1e-12)
            by_type.setdefault(row["noise_type"], []).append(noise)
    return {t: np.concatenate(v) for t, v in sorted(by_type.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("git_dir", type=pathlib.Path, help="a clone or bare mirror of " + REPO)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(".cache/librispeech"))
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("../shared/data"), help="the data folder (for testset_ood's noise)")
    args = p.parse_args(argv)
    commit = _resolve_commit(args.git_dir)
    if commit != COMMIT:
        print(f"warning: {args.git_dir} lacks commit {COMMIT}; using {commit}", file=sys.stderr)
    train_out = args.out / "speech" / "train"
    train_out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    train_files = _files(args.git_dir, commit, TRAIN_DIR)
    seconds = 0.0
    for path in train_files:
        x = _audio(args.git_dir, commit, path)
        seconds += len(x) / 16000
        digest.update(path.encode())
        digest.update(x.astype("<f8").tobytes())
        sf.write(train_out / pathlib.Path(path).name, x, 16000, subtype="PCM_16")
    print(f"{train_out}: {len(train_files)} utterances, {seconds / 60:.1f} min")

    noise = _ood_noise_by_type(args.data)
    types = list(noise)
    rng = np.random.default_rng(SEED)
    test_out = args.out / "testset_voices"
    for sub in ("clean", "noisy"):
        (test_out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    test_files = _files(args.git_dir, commit, TEST_DIR)
    order = rng.permutation(len(test_files))
    for k, i in enumerate(order):
        path = test_files[i]
        speaker = pathlib.Path(path).parent.name
        clean = _audio(args.git_dir, commit, path)[: int(MAX_SECONDS * 16000)]
        snr = SNRS[k % len(SNRS)]
        kind = types[(k // len(SNRS)) % len(types)]
        n = noise[kind]
        offset = int(rng.integers(len(n)))
        seg = np.resize(np.roll(n, -offset), len(clean))  # wraps round the joined signal when it is short
        gain = np.sqrt(np.mean(clean**2)) / np.sqrt(np.mean(seg**2)) / 10 ** (snr / 20)
        noisy = clean + gain * seg
        scale = min(1.0, 0.9 / np.max(np.abs(noisy)))
        name = f"voices{k:03d}_{pathlib.Path(path).stem}_{kind}_snr{snr}"
        sf.write(test_out / "clean" / f"{name}.flac", clean * scale, 16000, subtype="PCM_16")
        sf.write(test_out / "noisy" / f"{name}.flac", noisy * scale, 16000, subtype="PCM_16")
        digest.update(name.encode())
        digest.update((noisy * scale).astype("<f8").tobytes())
        rows.append({"id": name, "librispeech": path.removeprefix("audio_data/"), "speaker": speaker, "noise_type": kind,
                     "snr_db": snr, "noise_offset": offset, "noise_gain": f"{gain:.6g}", "scale": f"{scale:.6g}"})
    with open(test_out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{test_out}: {len(rows)} mixtures of {len({r['speaker'] for r in rows})} speakers x {len(types)} noise types")
    for name in ("LICENSE.TXT", "SPEAKERS.TXT"):
        (args.out / name).write_bytes(_git(args.git_dir, "show", f"{commit}:{TEST_DIR}/{name}"))
    (args.out / "README.md").write_text(
        f"LibriSpeech utterances (CC BY 4.0: LICENSE.TXT; speakers: SPEAKERS.TXT) from {REPO} at commit {commit},\n"
        f"folders {TRAIN_DIR} and {TEST_DIR}, written by tools/librispeech_voices.py (content sha256 {digest.hexdigest()[:16]}).\n"
        "testset_voices/ mixes the test-other utterances with the noise of testset_ood; see the script's docstring.\n")
    print(f"content sha256 {digest.hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
