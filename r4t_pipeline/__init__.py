"""R4T: set-valued fan-out retrieval by RL-compiled diffusion."""
