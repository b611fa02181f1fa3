"""Multi-process helpers. The information-entropy loss is a batch statistic: under DDP it
must see the global batch, so the teacher logits are all-gathered (with gradients) first."""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every process along dim 0; gradients flow back to each
    process's own slice. A no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)
