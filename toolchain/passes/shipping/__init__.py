"""The passes every pipeline ends with, whatever made its candidates: evaluate in the device's runtime,
benchmark, gate, sign a bundle, write the report.
"""
