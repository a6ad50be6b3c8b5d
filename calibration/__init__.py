"""Calibration: data sources, streaming histograms, threshold methods, tables.

Modules, in the order data flows through them:
- ``datasets``: ``open_data(path, input_specs, DataOptions) -> DataSource`` (folders of .npz,
  stacked .npy/.npz, image folders, ``module:function`` generators) and ``split_holdout``;
  ``feeds`` checks feeds against input specs and forms batches; ``images`` preprocesses.
- ``collect``: ``quantizable_tensors(model)`` and ``calibrate(model, feeds, ...) -> CalibrationTable``,
  running onnxruntime with the observed tensors as extra outputs.
- ``histograms``: one bounded-memory ``StreamingHistogram`` per tensor; ``kernels``: its compiled loops.
- ``methods``: entropy (TensorRT EntropyCalibration2), minmax, percentile, mse; uint8 ranges.
- ``table``: ``CalibrationTable`` (``calib.json``) and the TensorRT calibration cache.

Imports nothing from the compiler or the targets (data flows one way).
"""
