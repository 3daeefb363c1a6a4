"""All-reduce latency on two GPUs of one host: NCCL against torch's symmetric-memory one-shot and two-shot
all-reduces, each 64 times inside one CUDA graph (as a decode forward holds them), bf16 messages of 8 KB to 626 KB.

Produced docs/bench/allreduce-h200x2.json on 2x H200 (nvidia-h200-x2, torch 2.11.0+cu130, NVLink multicast off),
2026-11-29 23:07 UTC:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python docs/bench/allreduce_probe.py out.json

A one-off probe for docs/benchmarks.md ("Tensor parallelism"), not part of the package.
"""
import os, sys, time, json
import torch, torch.distributed as dist, torch.multiprocessing as mp

def bench_graph(fn, n_ops=64, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_ops): fn()
    for _ in range(5): g.replay()
    torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps): g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps / n_ops * 1e6

def worker(rank, world, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    res = {}
    for n in (4096, 5 * 4096, 4 * 5 * 8192, 128256 // 2 * 5):
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        res[f"nccl_graph_us_{n*2}B"] = bench_graph(lambda: dist.all_reduce(x))
        try:
            import torch.distributed._symmetric_memory as symm
            buf = symm.empty(n, dtype=torch.bfloat16, device="cuda")
            symm.rendezvous(buf, dist.group.WORLD.group_name)
            buf.copy_(x)
            name = dist.group.WORLD.group_name
            y = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
            ref = x.clone(); dist.all_reduce(ref)
            res[f"oneshot_ok_{n*2}B"] = bool(torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2))
            res[f"oneshot_graph_us_{n*2}B"] = bench_graph(lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name))
            try:
                res[f"twoshot_graph_us_{n*2}B"] = bench_graph(lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name))
            except Exception as e:
                res[f"twoshot_err"] = repr(e)[:200]
        except Exception as e:
            res[f"symm_err_{n*2}B"] = repr(e)[:300]
    if rank == 0:
        json.dump(res, open(out, "w"), indent=1); print(json.dumps(res, indent=1))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2)
