"""Diffusion building blocks, pure torch (no codec dependency).

* ``schedules``: η schedules of the residual-shifting bridge (NC-Diffusion), the cosine ᾱ of the
  Gaussian start (CDC baseline, CorrDiff), forward processes and one-step updates.
* ``samplers``: ``sample_bridge`` / ``sample_ddim`` with one signature, and ``seeded_noise``.
* ``objectives``: training batches (x_t, t, x0 target) for both processes.
* ``unet`` / ``affm``: the conditional U-Net with AFFM-filtered skips, and the ``Denoiser`` wrapper.

Images are in [-1, 1] everywhere here; convert with ``unet.to_model_range`` / ``from_model_range``.
Bridge time is t = η; Gaussian time is t ∈ [0, 1] with ᾱ(t).
"""
