"""Local training, evaluation, metrics, cross-validation and plots.

``loading`` (site folders to bags), ``fitting`` (``micromil train``), ``score``
(``evaluate``, ``calibrate``, ``predict``), ``compare`` (``evaluate --against``) and ``cv``
are what the CLI commands call. Every function there takes typed settings
(``ExperimentConfig``) and paths, never an argparse namespace, so notebooks, tests and the
Flower client call the same code.
"""
