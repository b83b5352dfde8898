"""cdm: Cascaded Diffusion Models (Ho et al. 2021) on MNIST, as a lesson."""
