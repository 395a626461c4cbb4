"""Speed paths: choices that change how fast something is computed, never what it computes.

``cpu_linear`` picks the CPU layout of a projection by row count and weight dtype;
``decode_trace`` records the decode step once per shape as a TorchScript trace and replays it.
The model (:mod:`llamakin.model`) keeps the math; :mod:`llamakin.hardware` says what the CPU
computes natively.
"""
