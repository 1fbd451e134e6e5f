"""The lowest layer: errors and the one registry type, the families (where each architecture keeps its blocks and
projections), the shared-weight store, safetensors files a tensor at a time, calibration and heal text, parameter
counts and the report base, size budgets, progress bars, and settings fields that are also command-line options."""
