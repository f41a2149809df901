"""Training objectives as pure torch: one module per objective, each an
`algorithms.base.Objective` (the contract: block size, layouts and masks, `loss`, a frozen
`Capabilities` record). The run builds them through their registry entries (registry/).

  base.py              the contract, the forward process (per-block t, masking, resampling),
                       SUBS and the loss reduction
  masking.py           the forward process shared by the masking objectives (MDLM/BD3-LM, SEDD)
  masked_diffusion.py  BD3-LM and MDLM (K = L)
  ar.py                the autoregressive baseline
  sedd.py              SEDD's score entropy
  ssdlm.py             SSD-LM's simplex diffusion (its own network)
  clip_search.py       BD3-LM's clip-interval search
"""

from algorithms.base import Capabilities, Layout, Loss, Objective, SamplingKeys

__all__ = ["Capabilities", "Layout", "Loss", "Objective", "SamplingKeys"]
