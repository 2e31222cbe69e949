"""ncpipe: compress image archives at scale with learned codecs and diffusion decoders."""

__version__ = "0.1.0"
