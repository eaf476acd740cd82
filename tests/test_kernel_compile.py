"""Every kernel compiles for an H100 (sm_90), on a machine without a GPU.

The interpreter accepts programs that the compiler rejects (layouts, dot shapes, types), so
the CPU suite also lowers each kernel to a cubin with the ptxas that ships with Triton, at
the tile sizes a GPU run uses. Runs in a subprocess, since this process interprets kernels.
"""

import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from esosae.kernels import decoder as D, encoder as E, orthogonality as O
    from esosae.kernels.utils import ORTH_TILE, dot_precision, matmul_config

    def build(kernel, ptrs, scalars, consts, cfg):
        sig = {n: "*" + ptrs[n] if n in ptrs else scalars.get(n, "constexpr") for n in kernel.arg_names}
        assert set(sig) - set(ptrs) - set(scalars) == set(consts), sorted(sig)
        triton.compile(ASTSource(kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg[0], "num_stages": cfg[1]})

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
    t, f32, i32 = sys.argv[1], "fp32", "i32"
    sizes = {"B": i32, "d": i32, "m": i32}
    c = matmul_config(4096, 16384, 2304, dtype, interpret=False)
    launch = (c.num_warps, c.num_stages)
    mm = dict(GROUP=c.GROUP, INTERP_BF16=False, PRECISION=dot_precision(dtype))
    build(E._encode_fwd_kernel, dict(x_ptr=t, w_ptr=t, b_enc_ptr=t, b_dec_ptr=t, theta_ptr=f32, f_ptr=t,
          l1_part_ptr=f32, fire_part_ptr=i32), sizes, dict(BLOCK_B=c.BLOCK_M, BLOCK_M=c.BLOCK_N, BLOCK_K=c.BLOCK_K, **mm),
          launch)
    build(E._encode_bwd_dx_kernel, dict(g_f_ptr=t, f_ptr=t, g_l1_ptr=f32, w_ptr=t, g_x_ptr=t), sizes,
          dict(BLOCK_B=c.BLOCK_M, BLOCK_D=c.BLOCK_N, BLOCK_K=c.BLOCK_K, **mm), launch)
    build(E._encode_bwd_dw_kernel, dict(x_ptr=t, b_dec_ptr=t, g_f_ptr=t, f_ptr=t, g_l1_ptr=f32, w_ptr=t, g_w_ptr=t,
          g_b_enc_ptr=t, g_b_dec_part_ptr=f32), sizes, dict(BLOCK_D=c.BLOCK_M, BLOCK_M=c.BLOCK_N, BLOCK_K=c.BLOCK_K, **mm),
          launch)
    build(D._decode_fwd_kernel, dict(f_ptr=t, w_ptr=t, bias_ptr=t, t_ptr=t, xh_ptr=t, sq_part_ptr=f32), sizes,
          dict(BLOCK_B=c.BLOCK_M, BLOCK_D=c.BLOCK_N, BLOCK_K=c.BLOCK_K, **mm), launch)
    build(D._decode_bwd_df_kernel, dict(g_xh_ptr=t, g_sq_ptr=f32, t_ptr=t, xh_ptr=t, w_ptr=t, g_f_ptr=t), sizes,
          dict(BLOCK_B=c.BLOCK_M, BLOCK_M=c.BLOCK_N, BLOCK_K=c.BLOCK_K, **mm), launch)
    build(D._decode_bwd_dw_kernel, dict(f_ptr=t, g_xh_ptr=t, g_sq_ptr=f32, t_ptr=t, xh_ptr=t, g_w_ptr=t,
          g_bias_ptr=t, g_t_ptr=t), sizes, dict(BLOCK_M=c.BLOCK_M, BLOCK_D=c.BLOCK_N, BLOCK_K=c.BLOCK_K,
          NEED_TARGET=True, **mm), launch)
    orth_sizes = {"m1": i32, "m2": i32, "d": i32, "n_cols_tiles": i32, "margin": f32, "scale": f32}
    oc = dict(TILE=ORTH_TILE, BLOCK_K=O._block_k(2304, interpret=False), HAS_TILES=True, INTERP_BF16=False,
              PRECISION=dot_precision(dtype))
    build(O._orth_fwd_kernel, dict(w1_ptr=t, w2_ptr=t, tiles_ptr=i32, part_ptr=f32), orth_sizes, oc, (4, 3))
    build(O._orth_bwd_kernel, dict(w1_ptr=t, w2_ptr=t, tiles_ptr=i32, g_out_ptr=f32, g1_ptr=f32, g2_ptr=f32),
          orth_sizes, dict(NEED_W1=True, NEED_W2=True, **oc), (4, 3))
    print("compiled")
""")


@pytest.mark.parametrize("dtype", ["bf16"])  # the tensor-core path; fp32 differs only in tile sizes and precision
def test_every_kernel_compiles_for_sm90(dtype, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    proc = subprocess.run([sys.executable, "-c", CODE, dtype], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "compiled", proc.stderr[-4000:]
