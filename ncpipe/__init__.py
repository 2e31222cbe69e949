"""ncpipe: compress image archives at scale with learned codecs and diffusion decoders."""

import warnings

__version__ = "0.1.0"

# CompressAI 1.2.8 calls torch.jit.script when imported, which torch 2.14 deprecates;
# users can do nothing about it, and it would otherwise open every worker's log.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
