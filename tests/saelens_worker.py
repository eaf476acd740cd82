"""Run in the sae-lens environment: ``python -P saelens_worker.py ACTS.safetensors OUT.safetensors DIR...``.

Loads each exported folder with SAELens's own ``SAE.load_from_disk`` and writes, for each
i, ``enc{i}`` = sae.encode(x_i) and ``dec{i}`` = sae.decode(enc{i}) where x_i is the tensor
``x{i}`` of ACTS; also ``arch{i}`` as the architecture's class name in a JSON sidecar.
"""

import json
import sys

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

acts_file, out_file, *dirs = sys.argv[1:]
acts, out, classes = load_file(acts_file), {}, {}
with torch.no_grad():
    for i, folder in enumerate(dirs):
        sae = SAE.load_from_disk(folder)
        f = sae.encode(acts[f"x{i}"])
        out[f"enc{i}"], out[f"dec{i}"] = f.contiguous(), sae.decode(f).contiguous()
        classes[str(i)] = type(sae).__name__
save_file(out, out_file)
print(json.dumps(classes))
