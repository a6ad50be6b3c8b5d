"""Calibration: data sources, streaming histograms, threshold methods, tables.

Imports nothing from the compiler or the targets (data flows one way).
"""
