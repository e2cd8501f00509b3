"""Enhance the shipped noisy example at P = 100 and P = 50 and compare with the clean reference.

    python examples/enhance_file.py [OUT_DIR]

Writes ``enhanced_P100.wav`` and ``enhanced_P50.wav`` into OUT_DIR (default: a temporary folder)
and prints, for each P, the SNR of the noisy input and of the enhanced output against
``examples/clean_dishes_5db.flac``, the time taken and the share of GRU neurons updated.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from npdgru import Enhancer

HERE = Path(__file__).resolve().parent


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """10 log10(|s|^2 / |s - y|^2): plain SNR of ``estimate`` against the clean ``reference``."""
    noise = reference - estimate
    return float(10.0 * np.log10(np.sum(reference**2) / max(np.sum(noise**2), 1e-20)))


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="npdgru-example-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    noisy, sr = sf.read(HERE / "noisy_dishes_5db.flac", dtype="float32")
    clean, sr_clean = sf.read(HERE / "clean_dishes_5db.flac", dtype="float32")
    assert sr == sr_clean and len(noisy) == len(clean)
    print(f"input: {len(noisy) / sr:.2f} s at {sr} Hz, SNR {snr_db(clean, noisy):+.2f} dB")

    for P in (100, 50):
        enh = Enhancer(update_percent=P)  # shipped NSNet2 weights, cpu backend
        enh.enhance(noisy[:sr // 10], sr)  # warm-up: compiles (or loads) the Numba kernels
        t0 = time.perf_counter()
        y = enh.enhance(noisy, sr)
        dt = time.perf_counter() - t0
        assert y.shape == noisy.shape and np.isfinite(y).all()
        path = out_dir / f"enhanced_P{P}.wav"
        sf.write(path, y, sr)
        gain = snr_db(clean, y) - snr_db(clean, noisy)
        print(f"P={P:>3}: SNR {snr_db(clean, y):+.2f} dB ({gain:+.2f} dB), {100 * enh.model.fraction_updated():.0f}% of GRU "
              f"neurons updated, {dt * 1e3:.1f} ms (real-time factor {dt * sr / len(noisy):.4f}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
