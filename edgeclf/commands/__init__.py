"""The commands of ``edgeclf``, one module each (the pattern of pip's and Django's commands).

Each module has ``register(sub)``, which adds its parser (its options beside the code that
uses them) with ``func=run``, and ``run(args) -> int``, the exit status. Modules import
their libraries inside ``run``, so ``edgeclf --help`` and ``edgeclf X --help`` load no
TensorFlow.
"""

#: In the order ``edgeclf --help`` lists them.
COMMANDS = ("train", "evaluate", "export", "predict", "bench", "serve", "loadtest", "verify", "pack", "unpack", "engine", "doctor", "dataset")
