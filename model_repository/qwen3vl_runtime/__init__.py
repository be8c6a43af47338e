"""Code shared by the Triton models of a built repository (relative imports only: the build
copies this package next to each model.py)."""
