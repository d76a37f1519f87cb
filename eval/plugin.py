"""lmms-eval's entry point (group ``lmms_eval.models``, name ``vlprune``). lmms-eval imports this module on every
``import lmms_eval.models``, so it imports nothing heavy until lmms-eval asks for the manifest."""

from __future__ import annotations


def model_manifest():
    """The ``vlprune`` model, a simple (context string + visuals) model: :class:`vlprune.eval.lmms_model.VLPrune`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlprune", simple_class_path="vlprune.eval.lmms_model.VLPrune")
