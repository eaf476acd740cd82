"""--dtype: what each choice resolves to on each device, and the matmul setting it implies."""

import pytest
import torch

from esosae.sae import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    assert precision.resolve("auto", CUDA, "triton") == "bf16"
    assert precision.resolve("auto", CPU, "torch") == "fp32"
    assert precision.resolve("auto", CPU, "triton") == "fp32"


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32", "tf32"])
def test_every_choice_runs_on_cuda(name):
    assert precision.resolve(name, CUDA, "triton") == name
    assert precision.operand_dtype(name) == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


@pytest.mark.parametrize("name", ["bf16", "fp16", "tf32"])
def test_the_cpu_backend_runs_fp32_only(name):
    with pytest.raises(precision.PrecisionError, match="--dtype fp32"):
        precision.resolve(name, CPU, "torch")
    assert precision.resolve(name, CPU, "triton") == name  # the interpreter, for tests


def test_unknown_choice_names_the_choices():
    with pytest.raises(precision.PrecisionError, match="bf16, fp16, fp32, tf32"):
        precision.resolve("fp8", CUDA, "triton")


@pytest.mark.parametrize("name,setting", [("tf32", "high"), ("fp32", "highest"), ("bf16", "highest")])
def test_matmul_precision_is_set_inside_and_restored_after(name, setting):
    old = torch.get_float32_matmul_precision()
    with precision.matmul_precision(name):
        assert torch.get_float32_matmul_precision() == setting
    assert torch.get_float32_matmul_precision() == old
