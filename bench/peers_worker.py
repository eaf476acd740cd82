"""SAELens's side of the peer race; runs in the peers environment (.venv-peers), not in ours.

    .venv-peers/bin/python -P bench/peers_worker.py RACE_FILE

``-P`` keeps the working directory off ``sys.path``: run from the repository root, our
top-level ``kernels/`` folder would otherwise shadow the ``kernels`` package that
``transformers`` probes for. The worker imports nothing of esosae (sae-lens pins
transformer-lens < 4, which esosae cannot share an environment with). It reads the race
file (bench/race_data.py) and answers one JSON line per JSON command line on stdin:

    {"case": "relu_l0_32", "steps": 1, "lr": 0.001, "l1": 2.0, "threads": 2}
        → {"times": [s, ...], "l0": [...]}: each step starts from the case's weights (the
          optimizer state carries over, as in training) and is timed from the forward
          to the end of the optimizer step; ``threads`` (optional) sets torch's intra-op
          threads for this command only;
    {"quit": true} → exits.

One step is SAELens's ``SAETrainer._train_step`` (sae_lens 6.x) without the logging and
schedulers: ``training_forward_pass`` (MSE + L1 on f·‖W_dec‖), the trainer's firing
statistics, backward, ``clip_grad_norm_(…, 1.0)``, Adam, ``zero_grad``.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from safetensors.torch import load_file


def main(path: str) -> None:
    import sae_lens
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    tensors = load_file(path)
    x = tensors["x"]  # (B, d)
    d, m = tensors["relu_l0_32.W_enc1"].shape
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999))  # as SAETrainer builds it
    since_fired = torch.zeros(m)  # the trainer's firing statistics
    act_freq = torch.zeros(m)
    names = {"W_enc": "W_enc1", "b_enc": "b_enc1", "W_dec": "W_dec1", "b_dec": "b_dec"}
    print(json.dumps({"ready": True, "torch": torch.__version__, "sae_lens": sae_lens.__version__,
                      "threads": torch.get_num_threads()}), flush=True)

    def step(l1: float, n: int) -> torch.Tensor:
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients={"l1": l1}, dead_neuron_mask=(since_fired > 1000).bool(),
            n_training_steps=n, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return firing

    n = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        for group in opt.param_groups:
            group["lr"] = cmd.get("lr", 1e-3)
        threads = torch.get_num_threads()
        torch.set_num_threads(cmd.get("threads", threads))
        times, l0s = [], []
        for _ in range(cmd["steps"]):
            with torch.no_grad():
                for ours, theirs in names.items():
                    getattr(sae, ours).copy_(tensors[f"{cmd['case']}.{theirs}"])
            t0 = time.perf_counter()
            firing = step(cmd.get("l1", 1.0), n)
            times.append(time.perf_counter() - t0)
            l0s.append(firing.sum(-1).mean().item())
            n += 1
        torch.set_num_threads(threads)
        print(json.dumps({"times": times, "l0": l0s}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
