"""Tests that need an NVIDIA GPU (marked ``gpu``); they skip cleanly anywhere else."""
