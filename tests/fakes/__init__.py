"""Structural fakes of outside models (same attribute names and call signatures, CPU-tiny sizes)."""

from policies.compat import cpu_torchvision

cpu_torchvision()  # before transformers imports a CUDA-only torchvision on a CPU machine
