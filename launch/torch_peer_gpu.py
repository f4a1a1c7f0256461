"""The torch peer on a GPU: EfficientNet-B0 under AMP (bf16 autocast) with channels_last.

    python launch/torch_peer_gpu.py --batch 16 --res 256 --steps 50 --channels-last
    python launch/torch_peer_gpu.py --batch 128 --res 256 --steps 30 --channels-last --compile max-autotune

The same work and the same JSON line as ../shared/bench/peers/torch_efficientnet_b0.py
(SGD with momentum 0.9, cross entropy, 5 classes, two untimed steps), moved to
CUDA with the settings a PyTorch user would pick there. The model is
torchvision's efficientnet_b0, because efficientnet_pytorch is rarely installed
on GPU images; the two are the same network. It is what `circlemix_jax.bench
--peer python3 --peer-script launch/torch_peer_gpu.py` alternates with on a GPU
(launch/gpu_bench.sh). `--compile MODE` wraps the model in torch.compile (Inductor,
mode 'default' or 'max-autotune'); its compile happens in the untimed steps.
"""

import argparse
import json
import sys
import time

try:
    import torch
    import torchvision
except ImportError as e:
    print(f"error: torch_peer_gpu.py needs torch and torchvision: {e}", file=sys.stderr)
    sys.exit(2)

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=16)
p.add_argument("--res", type=int, default=256)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--channels-last", action="store_true")
p.add_argument("--compile", default="", choices=("", "default", "max-autotune", "reduce-overhead"),
               help="torch.compile the model with this mode ('' = eager)")
a = p.parse_args()
if not torch.cuda.is_available():
    print("error: torch_peer_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
    sys.exit(2)
torch.manual_seed(0)
torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithms, as users do
dev = torch.device("cuda")
model = torchvision.models.efficientnet_b0(num_classes=5).to(dev)
x = torch.randn(a.batch, 3, a.res, a.res, device=dev)
y = torch.randint(0, 5, (a.batch,), device=dev)
if a.channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
if a.compile:
    model = torch.compile(model, mode=a.compile)
loss_fn = torch.nn.CrossEntropyLoss()


def train_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    loss.backward()  # bf16 needs no GradScaler: it has float32's exponent range
    opt.step()
    return loss.item()  # synchronises, like the CPU peer


def eval_step():
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    torch.cuda.synchronize()


def timed(fn):
    for _ in range(3 if a.compile else 2):  # a compiled model recompiles once when train() turns to eval()
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        fn()
    torch.cuda.synchronize()
    return a.batch * a.steps / (time.perf_counter() - t)


model.train()
train = timed(train_step)
model.eval()
ev = timed(eval_step)
print(json.dumps({"peer": "torch-torchvision-amp-bf16" + (f"-compile-{a.compile}" if a.compile else ""),
                  "torch": torch.__version__, "compile": a.compile or None,
                  "device": torch.cuda.get_device_name(), "channels_last": a.channels_last,
                  "batch": a.batch, "res": a.res, "steps": a.steps,
                  "train_img_s": round(train, 3), "eval_img_s": round(ev, 3),
                  "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))
