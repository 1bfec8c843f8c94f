import subprocess
import sys

import pytest

# Five steps of the grouped kernel (bf16 rows gathered, scored, weighted: blocks of 16-64 MB allocated and freed
# per step); prints the minor page faults of steps 3-5, once the heap has grown.
SCRIPT = """
import resource, sys, torch
from pairfree.devices import keep_freed_host_memory
from pairfree.grouped import GroupedMemory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
g = torch.Generator().manual_seed(0)
keys = torch.nn.functional.normalize(torch.randn(200_000, 512, generator=g), dim=1)
gm = GroupedMemory(keys, [keys], torch.device("cpu"), torch.bfloat16)
q = torch.nn.functional.normalize(keys[:256] + torch.randn(256, 512, generator=g), dim=1)
top = torch.randperm(200_000, generator=g)[:65536]
for i in range(5):
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    gm.group(q, top, None, 0.05)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; elsewhere it is a no-op")
def test_kernel_steps_reuse_freed_blocks_without_page_faults():
    kept, kept_faults = _faults("keep")
    _, default_faults = _faults("default")
    assert kept == "True"
    assert default_faults > 50_000  # each step's ~100 MB of fresh blocks faulted in page by page by default
    assert kept_faults < default_faults / 20
