"""conftest.py for PyTorch's `test/distributed/checkpoint/_experimental/` tests, run against core.

Copied next to those files (their imports rewritten to `core`) by run_upstream.py. Newer test
files import helpers torch 2.13's `torch.testing._internal` lacks; those are given here, as
no-ops where they only select hardware.
"""

import torch.testing._internal.common_utils as common_utils

if not hasattr(common_utils, "HardwareClassification"):

    class HardwareClassification:
        pass

    common_utils.HardwareClassification = HardwareClassification
