"""YAML presets shipped with vlprune (``vlprune.load_config(name)``)."""
