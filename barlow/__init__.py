"""Barlow Twins benchmark: convert -> pretrain -> probe -> report.

Every stage is a plain function here and a ``python -m barlow <stage>`` command; the Snakemake
workflow only wires paths, parameters and resources around them.
"""
__version__ = "0.1.0"
