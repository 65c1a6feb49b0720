"""micromil_core: the science of micromil-fl (MIL models, site data, training).

This package never imports flwr: it is usable from a notebook, a unit test or any
federated runtime. The Flower apps in ``server/`` and ``client/`` are thin wrappers.
"""

__version__ = "0.1.0"
