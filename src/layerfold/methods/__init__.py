"""Folding methods, one file each: ``tie`` (shared projections), ``relax`` (per-layer LoRA), ``drop`` (removal)."""
