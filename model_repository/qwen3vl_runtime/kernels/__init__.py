"""GPU kernels (Triton) for the decode step; imported only when the decoder runs on CUDA."""
