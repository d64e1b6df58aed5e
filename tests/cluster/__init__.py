"""Test-cluster harnesses (a real one-host SLURM cluster: see tests/cluster/slurm.py)."""
