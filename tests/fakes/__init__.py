"""Structural fakes of outside models (same attribute names and call signatures, CPU-tiny sizes)."""
