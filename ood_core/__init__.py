"""ood-lens core: which confidence score, on which layers, tells InD from OoD inputs, and how well.

Headless (no Streamlit). Conventions used throughout:

* images are float tensors in [0, 1] of shape ``(N, C, H, W)``;
* layer ids are torchinfo's ``(depth, depth_index)``, ``(0, 1)`` being the whole network;
* a confidence (conformity) is higher for more in-distribution inputs; a sample is flagged OoD
  when its confidence is <= a threshold, so OoD is the positive class of every ROC metric.
"""

__version__ = "0.1.0"
