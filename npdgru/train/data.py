"""Training mixtures made on the fly from ``../shared/data`` (speech/train + noise/train).

Rules: never read ``noise/test`` or ``testset/``; validation uses ``speech/val`` with
fixed mixtures (a fixed seed) over ``noise/train``.

One training example (:meth:`MixtureSampler.example`), each choice drawn from the sampler's own
``numpy.random.Generator`` so a run is reproducible from its seed:

- speech: a random ``seconds``-long crop of an utterance; utterances shorter than that are
  joined with further utterances of the same speaker (50-300 ms of silence between);
- noise: a random segment of one of the six training noises; with probability 0.3 a second
  noise is added at -6..+6 dB relative; with probability 0.25 babble (3 to 6 utterances of other
  training speakers summed) is the noise or is added to it; with probability 0.5 a random
  spectral tilt (first-order filter ``y[n] = x[n] + a x[n-1]``, ``a`` in [-0.9, 0.9]);
- SNR uniform in [-5, 15] dB (speech power over noise power, both over the whole crop);
- level: the mixture is scaled to an RMS uniform in [-40, -15] dBFS (clean by the same factor),
  then down if its peak exceeds 0.99.
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import soundfile as sf

from ..errors import NpdgruError

SAMPLE_RATE = 16000


def _read_folder(folder: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.flac"))
    if not files:
        raise NpdgruError(f"{folder}: no .flac files (expected ../shared/data from the project brief)")
    out = {}
    for f in files:
        x, sr = sf.read(f, dtype="float32", always_2d=False)
        if sr != SAMPLE_RATE or x.ndim != 1:
            raise NpdgruError(f"{f}: expected 16 kHz mono, got {sr} Hz, shape {x.shape}")
        out[f.stem] = x
    return out


def _speaker(stem: str) -> str:
    return stem.split("_", 1)[0]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


class MixtureSampler:
    """Draws (noisy, clean) training pairs; see the module docstring for the recipe."""

    def __init__(self, data_root, *, split: str = "train", seconds: float = 4.0, seed: int = 0):
        root = pathlib.Path(data_root)
        if split not in ("train", "val"):
            raise ValueError("split must be 'train' or 'val'")
        self.speech = _read_folder(root / "speech" / split)
        # Noise always comes from noise/train: noise/test is reserved for testset/.
        self.noises = list(_read_folder(root / "noise" / "train").values())
        # Babble always from *training* speakers (for the val split too: still never test data).
        self.babble_pool = self.speech if split == "train" else _read_folder(root / "speech" / "train")
        self.by_speaker = collections.defaultdict(list)
        for stem in self.speech:
            self.by_speaker[_speaker(stem)].append(stem)
        self.stems = sorted(self.speech)
        self.babble_stems = sorted(self.babble_pool)
        self.n = int(round(seconds * SAMPLE_RATE))
        self.rng = np.random.default_rng(seed)

    # -- pieces -----------------------------------------------------------------------------
    def _speech_crop(self, rng, stem: str) -> np.ndarray:
        x = self.speech[stem]
        spk = self.by_speaker[_speaker(stem)]
        while x.size < self.n:
            gap = np.zeros(int(rng.integers(800, 4800)), np.float32)
            x = np.concatenate([x, gap, self.speech[spk[int(rng.integers(len(spk)))]]])
        start = int(rng.integers(0, x.size - self.n + 1))
        return x[start : start + self.n].astype(np.float32)

    def _noise_segment(self, rng, noise: np.ndarray) -> np.ndarray:
        start = int(rng.integers(0, noise.size - self.n + 1))
        return noise[start : start + self.n]

    def _babble(self, rng, exclude: str) -> np.ndarray:
        out = np.zeros(self.n, np.float32)
        for _ in range(int(rng.integers(3, 7))):
            stem = self.babble_stems[int(rng.integers(len(self.babble_stems)))]
            if _speaker(stem) == exclude:
                continue
            x = self.babble_pool[stem]
            seg = np.zeros(self.n, np.float32)
            off = int(rng.integers(0, self.n))
            m = min(self.n - off, x.size)
            seg[off : off + m] = x[:m]
            out += seg / _rms(x)
        return out

    def _noise(self, rng, speaker: str) -> np.ndarray:
        k = int(rng.integers(len(self.noises)))
        noise = self._noise_segment(rng, self.noises[k]).astype(np.float64)
        noise /= _rms(noise)
        if rng.random() < 0.3:  # a second noise
            other = self._noise_segment(rng, self.noises[int(rng.integers(len(self.noises)))]).astype(np.float64)
            noise += other / _rms(other) * 10 ** (rng.uniform(-6, 6) / 20)
        if rng.random() < 0.25:  # babble from other speakers, alone or added
            babble = self._babble(rng, speaker).astype(np.float64)
            babble /= _rms(babble)
            noise = babble if rng.random() < 0.5 else noise + babble * 10 ** (rng.uniform(-6, 6) / 20)
        if rng.random() < 0.5:  # spectral tilt
            a = rng.uniform(-0.9, 0.9)
            noise = noise + a * np.concatenate([[0.0], noise[:-1]])
        return noise

    # -- examples ---------------------------------------------------------------------------
    def example(self, rng=None) -> tuple[np.ndarray, np.ndarray, float]:
        """One (noisy, clean, snr_db) pair, float32 arrays of ``seconds`` at 16 kHz."""
        rng = self.rng if rng is None else rng
        stem = self.stems[int(rng.integers(len(self.stems)))]
        clean = self._speech_crop(rng, stem).astype(np.float64)
        noise = self._noise(rng, _speaker(stem))
        snr = float(rng.uniform(-5.0, 15.0))
        noise *= _rms(clean) / _rms(noise) / 10 ** (snr / 20)
        noisy = clean + noise
        gain = 10 ** (rng.uniform(-40.0, -15.0) / 20) / _rms(noisy)
        peak = np.max(np.abs(noisy)) * gain
        if peak > 0.99:
            gain *= 0.99 / peak
        return (noisy * gain).astype(np.float32), (clean * gain).astype(np.float32), snr

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(noisy, clean), each (size, n) float32."""
        pairs = [self.example() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def fixed_set(self, count: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` reproducible pairs (noisy, clean, snr) from a fixed seed (validation)."""
        rng = np.random.default_rng(seed)
        pairs = [self.example(rng) for _ in range(count)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), np.array([p[2] for p in pairs])
