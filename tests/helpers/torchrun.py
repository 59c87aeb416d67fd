"""The ending every torchrun test script shares (tests/icl/runs/*_process_*.py)."""

import sys
import traceback

import torch.distributed as dist


def run_script(main) -> None:
    """``main(sys.argv[1])`` in each torchrun process, then a barrier and the process group closed; on
    an exception its traceback and exit status 1, so the test that launched torchrun sees why."""
    try:
        main(sys.argv[1])
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
