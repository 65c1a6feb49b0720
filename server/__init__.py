"""The Flower ServerApp of micromil-fl and the one-machine simulation runner."""

# First, before any module here imports torch: micromil_core sets the process's OpenMP
# defaults (see its __init__), which torch reads once, when it loads.
import micromil_core  # noqa: F401, E402
