"""Datasheet numbers of edge GPUs (dense FP16 tensor FLOP/s with FP32 accumulate, memory
bandwidth, memory). Sources: NVIDIA Ada GPU architecture whitepaper (RTX 4090, 4080), NVIDIA
Ampere GA102 whitepaper (RTX 3090, 3080), NVIDIA RTX A4000 / A5000 datasheets (sparse figure
halved for dense), NVIDIA Jetson AGX Orin / Orin NX datasheets (GPU FP16 dense estimated as half
the sparse tensor figure; memory is shared with the CPU, so 8 GB is reserved for the OS)."""
from moe_edge.config import GB, ServerSpec

RTX4090 = ServerSpec("rtx4090", memory_bytes=24 * GB, peak_flops=165.2e12, mem_bandwidth=1008e9,
                     reserved_bytes=2 * GB)
RTX4080 = ServerSpec("rtx4080", memory_bytes=16 * GB, peak_flops=97.5e12, mem_bandwidth=716.8e9,
                     reserved_bytes=2 * GB)
RTX3090 = ServerSpec("rtx3090", memory_bytes=24 * GB, peak_flops=71e12, mem_bandwidth=936e9,
                     reserved_bytes=2 * GB)
RTX3080 = ServerSpec("rtx3080", memory_bytes=10 * GB, peak_flops=59.5e12, mem_bandwidth=760e9,
                     reserved_bytes=1 * GB)
A5000 = ServerSpec("rtx_a5000", memory_bytes=24 * GB, peak_flops=111.1e12, mem_bandwidth=768e9,
                   reserved_bytes=2 * GB)
A4000 = ServerSpec("rtx_a4000", memory_bytes=16 * GB, peak_flops=76.7e12, mem_bandwidth=448e9,
                   reserved_bytes=2 * GB)
ORIN_AGX_32 = ServerSpec("jetson_agx_orin_32gb", memory_bytes=32 * GB, peak_flops=27e12,
                         mem_bandwidth=204.8e9, reserved_bytes=8 * GB)
ORIN_NX_16 = ServerSpec("jetson_orin_nx_16gb", memory_bytes=16 * GB, peak_flops=12.5e12,
                        mem_bandwidth=102.4e9, reserved_bytes=6 * GB)

GBPS = 1e9 / 8  # bytes/s of one gigabit per second
