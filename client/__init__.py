"""The Flower ClientApp that each hospital runs over its own site folder."""

# First, before any module here imports torch: micromil_core sets the process's OpenMP
# defaults (see its __init__), which torch reads once, when it loads.
import micromil_core  # noqa: F401, E402
