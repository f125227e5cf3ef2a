"""tint: tiny models from tiny data (textual + null-text inversion for few-shot distillation)."""

__version__ = "0.1.0"
