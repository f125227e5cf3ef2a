"""Diffusion backbones (SD, tiny random, tint's small generator), DDIM with CFG, textual
inversion and null-text inversion: the parts of TINT that specialise a generator.

The function ``textual_inversion`` is not re-exported here: it would shadow its module
(``import tint.diffusion.textual_inversion as ti`` must give the module).
"""

from tint.diffusion.backbone import load_backbone, load_stable_diffusion
from tint.diffusion.ddim import (
    ddim_invert,
    ddim_sample,
    ddim_schedule,
    ddim_step,
    guided_prediction,
)
from tint.diffusion.model import DiffusionBackbone, IdentityAutoencoder
from tint.diffusion.null_text import NullTextConfig, NullTextResult, null_text_inversion
from tint.diffusion.textual_inversion import (
    TextualInversionConfig,
    TextualInversionResult,
    add_placeholder_token,
    load_textual_inversion_file,
    save_textual_inversion,
)

__all__ = [
    "DiffusionBackbone",
    "IdentityAutoencoder",
    "NullTextConfig",
    "NullTextResult",
    "TextualInversionConfig",
    "TextualInversionResult",
    "add_placeholder_token",
    "ddim_invert",
    "ddim_sample",
    "ddim_schedule",
    "ddim_step",
    "guided_prediction",
    "load_backbone",
    "load_stable_diffusion",
    "load_textual_inversion_file",
    "null_text_inversion",
    "save_textual_inversion",
]
