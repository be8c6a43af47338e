"""Sources of the Triton models that every build copies into its output repository.

Each ``<model>/1/model.py`` is a thin Triton adapter; the code they share lives in the
``qwen3vl_runtime`` package, which the build copies next to each ``model.py`` so that a built
repository imports nothing from this project.
"""

from pathlib import Path

SOURCE_DIR = Path(__file__).parent
RUNTIME_PACKAGE = SOURCE_DIR / "qwen3vl_runtime"
