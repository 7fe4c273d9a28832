"""The checks behind the notebooks' exercises, one module a lesson.

Each `check_*` takes the learner's function, tries it on inputs of its own, compares
with llmopt's implementation and prints what it found. It returns True or False and
never stops the notebook, so a learner who skips an exercise runs on; with
`LLMOPT_STRICT=1` (how CI runs the solutions) a failed check raises instead.

    from llmopt import exercises
    exercises.check_absmax(my_quantize, my_dequantize)
"""
from .lesson00 import check_perplexity, check_roofline_floor
from .lesson01 import check_absmax, check_groupwise, check_pack_int4, check_zero_point
from .lesson02 import check_gptq_column
from .lesson03 import check_fake_quant, check_ste
from .lesson04 import check_nm_mask, check_wanda_mask
from .lesson05 import check_distillation_loss, check_soft_targets
from .lesson06 import check_lowrank_factor, check_rank_for_energy, check_whitened_factor
from .lesson07 import check_balancing_loss, check_sorted_dispatch, check_top_k_gating
from .lesson08 import check_int4_gemv, check_rmsnorm_kernel, check_swiglu_kernel
from .lesson09 import (
    check_block_allocator,
    check_merge_partials,
    check_paged_attention,
    check_scheduler_step,
    check_speculative_accept,
)
from .lesson11 import check_pareto_front

__all__ = ["check_perplexity", "check_roofline_floor", "check_absmax", "check_zero_point", "check_groupwise",
           "check_pack_int4", "check_gptq_column", "check_ste", "check_fake_quant", "check_wanda_mask",
           "check_nm_mask", "check_soft_targets", "check_distillation_loss", "check_rank_for_energy",
           "check_lowrank_factor", "check_whitened_factor", "check_top_k_gating", "check_balancing_loss",
           "check_sorted_dispatch", "check_rmsnorm_kernel", "check_swiglu_kernel", "check_int4_gemv",
           "check_block_allocator", "check_paged_attention", "check_merge_partials", "check_scheduler_step",
           "check_speculative_accept",
           "check_pareto_front"]
