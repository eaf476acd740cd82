"""The roofline MODEL of one training step: ``pytest bench/test_roofline.py --benchmark-only``.

Builds bench/roofline.py's model (every op of our dual-layer step and of SAELens's
single-layer step, both shapes, H100 SXM and H200, bf16 / tf32 / fp32) and rewrites
bench/results/roofline.md, so a full ``pytest bench/ --benchmark-only`` run refreshes it next
to the measured tables. The timing is of the model's arithmetic on the CPU (milliseconds)
and says nothing about any GPU; the predicted bounds and speed-ups go into ``extra_info``
and the derived numbers, each labelled as a model.
"""

from __future__ import annotations

import roofline


def test_roofline_model(benchmark, report):
    text = benchmark.pedantic(roofline.main, args=([],), rounds=3, iterations=1)
    assert roofline.OUT.read_text() == text + "\n" and "MODEL" in text
    for shape in roofline.SHAPES:
        for dev in roofline.DEVICES:
            dense = roofline.bound(roofline.step_ops(shape, "bf16"), dev)
            ours = roofline.bound(roofline.step_ops(shape, "bf16", "pairs"), dev)
            saelens = roofline.bound(roofline.saelens_ops(shape, "bf16"), dev)
            key = f"MODEL {shape.name} {dev.name} bf16"
            benchmark.extra_info[f"{key} ours_dense_us"] = dense * 1e6
            benchmark.extra_info[f"{key} ours_pairs_us"] = ours * 1e6
            benchmark.extra_info[f"{key} saelens_as_coded_us"] = saelens * 1e6
            benchmark.extra_info[f"{key} crossover_density"] = roofline.crossover(shape, dev)
            report(f"{key}: SAELens (as coded) bound / our pair-path bound", saelens / ours, ".2f")
