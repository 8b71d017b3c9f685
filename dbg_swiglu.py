import sys, torch
from fxquant.kernels import w8a8_gemm as kg, common
m, k, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); ci = int(sys.argv[4]); tma = sys.argv[5] == "1"
cfgs = [c for c in kg.get_autotune_configs() if c.fxquant_gated]
c = cfgs[ci]; kw = dict(c.kwargs)
g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).cuda()
w = torch.randint(-127, 128, (2 * n, k), dtype=torch.int8, generator=g).cuda()
sa = torch.rand(m).cuda() + 0.01; sw = torch.rand(2 * n).cuda() * 0.01; bias = torch.randn(2 * n).cuda()
out = torch.full((m, n), float("nan"), device="cuda")
grid = (common.cdiv(m, kw["BLOCK_M"]) * common.cdiv(n, kw["BLOCK_N"]),)
if not tma:
    kg._w8a8_gemm_kernel.fn.fn[grid](a, w, out, sa, sw, bias, m, n, k, 8, a.stride(0), 1, w.stride(0), 1, out.stride(0), 1,
        HAS_BIAS=True, ACTIVATION="swiglu", GATED=True, EVEN_K=k % kw["BLOCK_K"] == 0, num_warps=c.num_warps, num_stages=c.num_stages, **kw)
torch.cuda.synchronize()
ref = kg.w8a8_linear_reference(a, sa, w, sw, bias, "swiglu", torch.float32)
print(ci, kw, c.num_warps, c.num_stages, "maxerr", (out - ref).abs().max().item(), flush=True)
