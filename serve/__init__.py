"""Serving beyond one device: Triton model repositories and ``edgeclf serve``.

- :mod:`edgeclf.serve.triton_config`: Triton ``config.pbtxt`` built and checked with
  Triton's own model-config protobuf (shipped in tritonclient).
- :mod:`edgeclf.serve.repository`: a bundle's validated artifacts as a Triton model
  repository (``edgeclf export BUNDLE --format triton --out REPO``).
- :mod:`edgeclf.serve.server`: the Predictor behind a real Triton server with PyTriton
  (``edgeclf serve BUNDLE``).
- :mod:`edgeclf.serve.load`: a bounded load run against a server, with malformed
  requests interleaved (``edgeclf loadtest``).

Needs ``pip install 'edgeclf[serve]'`` (nvidia-pytriton, tritonclient); no TensorFlow.
"""
