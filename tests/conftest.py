"""Suite-wide settings. The tests run tiny models whose cost is per-op overhead, not arithmetic: one intra-op
thread is as fast on an idle machine and several times faster on a shared one (OpenMP threads spin-wait for
busy cores)."""

import torch

torch.set_num_threads(1)
