"""minicontrol: ControlNet (arXiv:2302.05543) on Stable Diffusion 1.x/2.x in plain PyTorch."""
