"""``dlrm-serve``: artifacts behind the Open Inference Protocol on Ray Serve (``app``), its
message codec (``protocol``, numpy only) and command line (``cli``). Needs ``ray[serve]``
(``pip install 'dlrmc[serve]'``); the rest of ``dlrmc.runtime`` does not."""
