"""tint: tiny models from tiny data (textual + null-text inversion for few-shot distillation).

``import tint`` stays light (no torch): the public API is imported on first use.

    model_dir = tint.fit("photos/", out="my-model")          # photos/<class>/<images>
    tint.Predictor(model_dir).predict(["a.jpg"])[0].label     # onnxruntime only
"""

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily by __getattr__). The fit module is
# tint.fitting, not tint.fit: importing a submodule named "fit" would replace the function.
_LAZY = {"fit": "tint.fitting", "Predictor": "tint.predict"}

__all__ = ["Predictor", "fit", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'tint' has no attribute {name!r}")
