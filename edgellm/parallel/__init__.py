"""One phase across several devices: tensor-parallel prefill ranks (tp.py) and
pipeline-parallel decode stages. layout.py says who owns which heads and layers."""
