"""Training mixtures made on the fly from ``../shared/data``.

Rules: never read ``noise/test``, ``testset/`` or ``testset_ood/``. Validation mixtures use
``speech/val`` and held-out noise (fixed seed): the last 10 % of each ``noise/train`` recording
and every tenth clip of each type of ``noise/extra/train`` (by clip, so no validation clip is
ever heard in training).

Two recipes; ``npdgru train --recipe`` picks one and ``config.json`` records it.

**v2** (default; :meth:`MixtureSampler.example`), each choice drawn from the sampler's own
``numpy.random.Generator`` so a run is reproducible from its seed:

- speech: a random ``seconds``-long crop of an utterance; utterances shorter than that are
  joined with further utterances of the same speaker (50-300 ms of silence between);
- reverberation (probability 0.2): the speech is convolved with one of the measured RIRs of
  ``noise/extra/rir`` whose late part (after the direct path + 50 ms) is scaled by a gain in
  [0.1, 1] ("light" reverberation), cut to 1 s. The **target is the reverberant speech**: the
  models are denoisers, as the NSNet2 teacher is, and a 20 ms-frame mask cannot undo a hall; a
  dry target would ask the student for something its teacher never does;
- noise: a noise *type* drawn uniformly from the six ``noise/train`` recordings and the types of
  ``noise/extra/train`` (file-name prefix), then a clip of that type. Clips shorter than the
  crop are looped from a random start; longer ones are cropped where they carry energy (a crop
  is redrawn, up to 4 times, while its RMS is below 30 % of the clip's). With probability 0.3 a
  second noise is added at -6..+6 dB; with probability 0.25 babble (3 to 6 utterances of other
  training speakers) is the noise or is added to it; with probability 0.5 a random spectral tilt
  (``y[n] = x[n] + a x[n-1]``, ``a`` in [-0.9, 0.9]);
- SNR uniform in [-5, 20] dB (speech power over noise power, over the whole crop);
- level: the mixture is scaled to an RMS uniform in [-45, -12] dBFS (clean by the same factor),
  then down if its peak exceeds 0.99.

**Augmentation** ``augment="voice"`` (``npdgru train --augment voice``; training split only,
validation mixtures are never augmented), drawn from the same generator, before the noise:

- speed (probability 0.5): the speech crop is resampled by 0.9, 0.95, 1.05 or 1.1 (tempo, pitch
  and formants move together, the speed perturbation of Ko et al., Interspeech 2015; a longer or
  shorter crop is read first so the result keeps ``seconds``);
- EQ (probability 0.5): 1 to 3 peaking biquads (RBJ cookbook), centre 100-6000 Hz log-uniform,
  gain ±8 dB, Q 0.5-2: another voice and microphone;
- level ramp (probability 0.3): a gain moving linearly in dB between two values in ±6 dB across
  the crop (a talker moving);

and after the SNR is set, the same linear channel on speech and noise (so noisy = clean + noise
stays exact and the target is the speech as the channel delivers it):

- band limits (probability 0.3 each): a 2nd-order Butterworth high-pass at 50-250 Hz, a
  6th-order low-pass at 3.5-7.5 kHz;
- resampling chain (probability 0.2): down to 8 or 12 kHz and back (polyphase, scipy).

**More voices** (``extra_speech``, ``npdgru train --extra-speech FOLDER``; training split only):
folders of further clean speech (e.g. the LibriSpeech subset that ``tools/librispeech_voices.py``
writes). Each file counts as its own speaker; an example's utterance comes from them with
probability ``extra_share`` (``--extra-speech-share``, default 0.3), else from ``speech/train``.
Babble may then contain them too.

**v1** (the recipe of the first fine-tunes): only the six ``noise/train`` recordings (all of
them, validation included), no reverberation, SNR in [-5, 15] dB, level in [-40, -15] dBFS.

Audio is read from ``.flac`` or ``.ogg`` files (a compact Opus copy of the corpus serves for
training on a remote GPU; see ``training/README.md``).
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import soundfile as sf

from ..errors import NpdgruError, ParameterError

SAMPLE_RATE = 16000


def _read_folder(folder: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(f for f in folder.glob("*") if f.suffix in (".flac", ".ogg"))
    if not files:
        raise NpdgruError(f"{folder}: no .flac or .ogg files (expected the corpus of ../shared/data)")
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


def _noise_type(stem: str) -> str:
    """The type of a ``noise/extra`` clip: its file-name prefix (``animals__esc10__...`` → animals)."""
    return stem.split("__", 1)[0]


def _light_rir(rng, rir: np.ndarray) -> np.ndarray:
    """A measured RIR with its late part scaled by a gain in [0.1, 1], cut to 1 s, direct path first."""
    d = int(np.argmax(np.abs(rir)))
    h = rir[d : d + SAMPLE_RATE].astype(np.float64)
    early = int(0.05 * SAMPLE_RATE)
    h[early:] *= rng.uniform(0.1, 1.0)
    return h / np.abs(h[0])  # the direct path keeps the speech level (SNR is set after)


RECIPES = ("v1", "v2")
AUGMENTS = ("none", "voice")
SPEEDS = ((10, 9), (20, 19), (20, 21), (10, 11))  # (up, down) of resample_poly: speed = down / up


def _peaking(f0: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of an RBJ-cookbook peaking EQ biquad at 16 kHz."""
    A = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * f0 / SAMPLE_RATE
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * A, -2 * np.cos(w0), 1 - alpha * A])
    a = np.array([1 + alpha / A, -2 * np.cos(w0), 1 - alpha / A])
    return b / a[0], a / a[0]


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """x cut or zero-padded to n samples."""
    return x[:n] if x.size >= n else np.concatenate([x, np.zeros(n - x.size, x.dtype)])


def _voice(rng, sampler, stem: str, n: int) -> np.ndarray:
    """The speech crop of ``stem`` with the voice augmentations of the module docstring, float64 (n,)."""
    from scipy.signal import lfilter, resample_poly

    if rng.random() < 0.5:
        up, down = SPEEDS[int(rng.integers(len(SPEEDS)))]
        x = resample_poly(sampler._speech_crop(rng, stem, -(-n * down // up)).astype(np.float64), up, down)
        x = _fit(x, n)
    else:
        x = sampler._speech_crop(rng, stem, n).astype(np.float64)
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            f0 = float(np.exp(rng.uniform(np.log(100.0), np.log(6000.0))))
            b, a = _peaking(f0, rng.uniform(-8.0, 8.0), rng.uniform(0.5, 2.0))
            x = lfilter(b, a, x)
    if rng.random() < 0.3:
        g0, g1 = rng.uniform(-6.0, 6.0, size=2)
        x = x * 10 ** (np.linspace(g0, g1, n) / 20)
    return x


def _channel(rng, signals: list[np.ndarray]) -> list[np.ndarray]:
    """The same random linear channel (band limits, resampling chain) applied to every signal."""
    from scipy.signal import butter, resample_poly, sosfilt

    stages = []
    if rng.random() < 0.3:
        stages.append(("sos", butter(2, rng.uniform(50.0, 250.0), "highpass", fs=SAMPLE_RATE, output="sos")))
    if rng.random() < 0.3:
        stages.append(("sos", butter(6, rng.uniform(3500.0, 7500.0), "lowpass", fs=SAMPLE_RATE, output="sos")))
    if rng.random() < 0.2:
        stages.append(("rs", (1, 2) if rng.random() < 0.5 else (3, 4)))  # to 8 or 12 kHz
    out = []
    for x in signals:
        n = x.size
        for kind, st in stages:
            if kind == "sos":
                x = sosfilt(st, x)
            else:
                up, down = st
                x = _fit(resample_poly(resample_poly(x, up, down), down, up), n)
        out.append(x)
    return out
VAL_FRACTION = 0.1  # of each noise/train recording (its end) and of each extra type (every 10th clip)


class MixtureSampler:
    """Draws (noisy, clean) training pairs; see the module docstring for the recipes."""

    def __init__(self, data_root, *, split: str = "train", seconds: float = 4.0, seed: int = 0, recipe: str = "v2",
                 augment: str = "none", extra_speech=(), extra_share: float = 0.3):
        root = pathlib.Path(data_root)
        if split not in ("train", "val"):
            raise ParameterError(f"split must be 'train' or 'val', got {split!r}")
        if recipe not in RECIPES:
            raise ParameterError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if augment not in AUGMENTS:
            raise ParameterError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.recipe = recipe
        self.augment = augment
        self.speech = _read_folder(root / "speech" / split)
        if not 0.0 <= extra_share <= 1.0:
            raise ParameterError(f"extra_share must be in [0, 1], got {extra_share}")
        self.extra_share = extra_share
        self.extra_stems: list[str] = []
        if split == "train":  # more voices: each file its own speaker, drawn with probability extra_share
            for folder in extra_speech:
                for stem, x in _read_folder(pathlib.Path(folder)).items():
                    key = f"{pathlib.Path(folder).name}/{stem}"
                    self.speech[key] = x
                    self.extra_stems.append(key)
        # Noise always comes from noise/train (+ noise/extra/train): noise/test is reserved for testset/.
        base = _read_folder(root / "noise" / "train")
        self.rirs: list[np.ndarray] = []
        if recipe == "v1":
            self.noise_types = {stem: [x] for stem, x in base.items()}
        else:
            self.noise_types = {}
            for stem, x in base.items():  # long recordings: split in time
                cut = int(round(x.size * (1 - VAL_FRACTION)))
                self.noise_types[stem] = [x[:cut] if split == "train" else x[cut:]]
            extra = root / "noise" / "extra"
            if (extra / "train").is_dir():
                by_type = collections.defaultdict(list)
                for stem, x in sorted(_read_folder(extra / "train").items()):
                    by_type[_noise_type(stem)].append(x)
                for kind, clips in by_type.items():  # short clips: split by clip
                    if len(clips) < 2:  # a single clip stays in training
                        chosen = clips if split == "train" else []
                    else:
                        chosen = [c for i, c in enumerate(clips) if (i % int(1 / VAL_FRACTION) == 5) == (split == "val")]
                    if chosen:
                        self.noise_types[kind] = chosen
            if (extra / "rir").is_dir():
                self.rirs = list(_read_folder(extra / "rir").values())
        self.type_names = sorted(self.noise_types)
        self.noises = [x for k in self.type_names for x in self.noise_types[k]]  # every noise array
        # Babble always from *training* speakers (for the val split too: still never test data).
        self.babble_pool = self.speech if split == "train" else _read_folder(root / "speech" / "train")
        self.by_speaker = collections.defaultdict(list)
        for stem in self.speech:
            self.by_speaker[_speaker(stem)].append(stem)
        self.stems = sorted(set(self.speech) - set(self.extra_stems))
        self.extra_stems.sort()
        self.babble_stems = sorted(self.babble_pool)
        self.n = int(round(seconds * SAMPLE_RATE))
        self.rng = np.random.default_rng(seed)
        v2 = recipe == "v2"
        self.snr_range = (-5.0, 20.0) if v2 else (-5.0, 15.0)
        self.level_range = (-45.0, -12.0) if v2 else (-40.0, -15.0)
        self.p_reverb = 0.2 if v2 and self.rirs else 0.0

    # -- pieces -----------------------------------------------------------------------------
    def _speech_crop(self, rng, stem: str, n: int | None = None) -> np.ndarray:
        n = self.n if n is None else n
        x = self.speech[stem]
        spk = self.by_speaker[_speaker(stem)]
        while x.size < n:
            gap = np.zeros(int(rng.integers(800, 4800)), np.float32)
            x = np.concatenate([x, gap, self.speech[spk[int(rng.integers(len(spk)))]]])
        start = int(rng.integers(0, x.size - n + 1))
        return x[start : start + n].astype(np.float32)

    def _noise_segment(self, rng, noise: np.ndarray) -> np.ndarray:
        if noise.size < self.n:  # a short event clip: loop it from a random start
            reps = -(-(self.n + noise.size) // noise.size)
            start = int(rng.integers(0, noise.size))
            return np.tile(noise, reps)[start : start + self.n]
        if self.recipe == "v1":
            start = int(rng.integers(0, noise.size - self.n + 1))
            return noise[start : start + self.n]
        floor = 0.3 * _rms(noise)
        for _ in range(5):  # crop where the clip carries energy
            start = int(rng.integers(0, noise.size - self.n + 1))
            seg = noise[start : start + self.n]
            if _rms(seg) >= floor:
                break
        return seg

    def _draw_noise(self, rng) -> np.ndarray:
        if self.recipe == "v1":
            return self.noises[int(rng.integers(len(self.noises)))]
        clips = self.noise_types[self.type_names[int(rng.integers(len(self.type_names)))]]
        return clips[int(rng.integers(len(clips)))]

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
        noise = self._noise_segment(rng, self._draw_noise(rng)).astype(np.float64)
        noise /= _rms(noise)
        if rng.random() < 0.3:  # a second noise
            other = self._noise_segment(rng, self._draw_noise(rng)).astype(np.float64)
            noise += other / _rms(other) * 10 ** (rng.uniform(-6, 6) / 20)
        if rng.random() < 0.25:  # babble from other speakers, alone or added
            babble = self._babble(rng, speaker).astype(np.float64)
            babble /= _rms(babble)
            noise = babble if rng.random() < 0.5 else noise + babble * 10 ** (rng.uniform(-6, 6) / 20)
        if rng.random() < 0.5:  # spectral tilt
            a = rng.uniform(-0.9, 0.9)
            noise = noise + a * np.concatenate([[0.0], noise[:-1]])
        return noise

    def _reverberate(self, rng, clean: np.ndarray) -> np.ndarray:
        from scipy.signal import fftconvolve

        h = _light_rir(rng, self.rirs[int(rng.integers(len(self.rirs)))])
        return fftconvolve(clean, h)[: clean.size]

    # -- examples ---------------------------------------------------------------------------
    def example(self, rng=None) -> tuple[np.ndarray, np.ndarray, float]:
        """One (noisy, clean, snr_db) pair, float32 arrays of ``seconds`` at 16 kHz."""
        rng = self.rng if rng is None else rng
        if self.extra_stems and rng.random() < self.extra_share:
            stem = self.extra_stems[int(rng.integers(len(self.extra_stems)))]
        else:
            stem = self.stems[int(rng.integers(len(self.stems)))]
        voice = self.augment == "voice"
        clean = _voice(rng, self, stem, self.n) if voice else self._speech_crop(rng, stem).astype(np.float64)
        if self.p_reverb and rng.random() < self.p_reverb:
            clean = self._reverberate(rng, clean)  # the target is the reverberant speech
        noise = self._noise(rng, _speaker(stem))
        snr = float(rng.uniform(*self.snr_range))
        noise *= _rms(clean) / _rms(noise) / 10 ** (snr / 20)
        if voice:
            clean, noise = _channel(rng, [clean, noise])
        noisy = clean + noise
        gain = 10 ** (rng.uniform(*self.level_range) / 20) / _rms(noisy)
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
