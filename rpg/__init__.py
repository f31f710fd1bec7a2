"""RPG: Recurrent diffusion for large-scale Parameter Generation."""
__version__ = "0.1.0"
