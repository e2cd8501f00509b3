"""npdgru: the Dynamic GRU (D-GRU) for compute-efficient speech enhancement, in NumPy + Numba.

The main entry points are available at the top level::

    from npdgru import Enhancer
    y = Enhancer(model="dprnn", update_percent=50).enhance(x, sample_rate=16000)

    import npdgru
    y = npdgru.enhance(x, sr)        # one call; an Enhancer is made once per set of options and kept

Layers of the package (imports point down; ``docs/design.md``): ``cli`` -> ``corpus`` (many
files) -> ``enhance`` -> ``streaming`` -> ``hop`` -> ``audio``, ``resample`` -> ``model`` ->
``kernels`` (reference, cpu, cuda) -> ``weights`` -> ``plan`` -> ``kinds`` (one class per layer
kind) -> ``reference`` (the NumPy specification, importing nothing of npdgru) -> ``errors``.
The names below are imported on first use, so ``import npdgru`` stays cheap.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Enhancer": "enhance",
    "Stream": "streaming",
    "StreamBatch": "streaming",
    "ALGORITHMIC_LATENCY": "streaming",
    "read_audio": "audio",
    "write_audio": "audio",
    "MaskModel": "model",
    "Weights": "weights",
    "load_weights": "weights",
    "save_weights": "weights",
    "shipped_models": "shipped",
    "model_path": "shipped",
    "convert_checkpoint": "convert",
    "NpdgruError": "errors",
    "ParameterError": "errors",
    "AudioError": "errors",
    "WeightsError": "errors",
    "CheckpointError": "errors",
    "StreamInputError": "errors",
}

__all__ = ["__version__", "enhance", *_EXPORTS]


def __getattr__(name):
    if name == "enhance":  # the module npdgru.enhance, which is also callable: npdgru.enhance(x, sr, **options)
        from importlib import import_module

        return import_module(".enhance", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npdgru' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
