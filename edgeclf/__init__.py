"""edgeclf: from a Keras integer image classifier to a fast, verified model on the edge.

The package is split at the device line: ``edgeclf.train`` and ``edgeclf.export`` need
TensorFlow; ``edgeclf.runtime`` needs only numpy, Pillow and one inference backend.
Importing ``edgeclf`` itself imports nothing heavy.
"""

__version__ = "0.1.0"
