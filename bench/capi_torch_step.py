"""The official CAPI training step timed on random data, to run beside
`python -m mim_jax.bench --config=configs/capi.py` on the same device (bench/gpu_teachers.sh).

Not part of the library. It imports the official `model.py` from a checkout of
facebookresearch/capi (`git clone https://github.com/facebookresearch/capi bench/ref/capi`;
bench/ref/ is git-ignored) and repeats the step of its `train_capi.py`: the EMA teacher's forward
and the online clustering with its loss's backward (`do_teacher`), the student's forward, loss and
backward (`do_student`), AdamW on the student and on the clustering head, the EMA update; the two
halves compiled with torch.compile as the official code compiles them. What differs on one GPU,
none of it changing the FLOPs:
- SimpleFSDP (it needs xformers) is replaced by what it does on one device: a parametrization
  that hands every parameter to the compute in bf16 (fp32 master weights and gradients); the
  images are bf16, as the official collate casts them;
- no selective activation checkpointing (the official one recomputes only pointwise ops);
- random visible/predicted positions of the official counts instead of inverse-block masks.

  python bench/capi_torch_step.py [--variant=L/14] [--batch=256] [--steps=20] [--capi_dir=bench/ref/capi]

Prints one line: `capi_torch <variant> batch <B>: <images/s> images/s, <ms> ms/step, peak <GiB> GiB`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import types

import torch
import torch.nn.functional as F

# width, heads, encoder depth, predictor depth (paper Table 8; "Ti" is a CPU smoke-test size)
SIZES = {"Ti": (192, 3, 2, 1), "S": (384, 6, 12, 6), "B": (768, 12, 12, 6), "L": (1024, 16, 24, 12)}


def import_official_model(capi_dir: pathlib.Path):
    """The official model.py, with stand-ins for the imports it needs only for annotations and
    for `weight_norm` (the official `utils` module also pulls in sklearn, rich and einops)."""
    if not (capi_dir / "model.py").exists():
        sys.exit(f"No official CAPI checkout at {capi_dir}: git clone https://github.com/facebookresearch/capi "
                 f"{capi_dir}")
    sys.path.insert(0, str(capi_dir))
    utils = types.ModuleType("utils")
    utils.weight_norm = torch.nn.utils.weight_norm          # the same g * v / ||v|| reparametrisation
    sys.modules.setdefault("utils", utils)
    for name in ("jaxtyping", "omegaconf"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.Float = stub.Int = _Annotation()       # used in type annotations only
            stub.OmegaConf = None                        # used by the weight loader only
            sys.modules[name] = stub
    import model
    return model


class _CastTo(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def compute_in(module, dtype):
    """SimpleFSDP on one device: each parameter reaches the compute cast to `dtype`."""
    for sub in list(module.modules()):
        for name, param in list(sub._parameters.items()):
            if param is not None:
                torch.nn.utils.parametrize.register_parametrization(sub, name, _CastTo(dtype), unsafe=True)
    return module


class _Annotation:
    def __getitem__(self, item):
        return object


def teacher_step(models, images, predict_indices):
    """`do_teacher`: teacher tokens without gradient, online clustering with its loss's graph, the
    targets at the predicted positions."""
    with torch.no_grad():
        tokens, _ = models["teacher"].forward_pretrain(images)
    batch, positions, _ = tokens.shape
    assignments, loss = models["clustering"](tokens.transpose(0, 1))
    with torch.no_grad():
        flat = assignments.detach().transpose(0, 1).reshape(batch * positions, -1)
        targets = torch.index_select(flat, 0, predict_indices)
    return targets, loss


def student_step(models, images, predict_indices, visible_indices, targets, temperature: float):
    """`do_student`: encoder on the visible positions, predictor at the predicted ones, the head,
    the soft cross-entropy in float32 (summed in float64 as the official code does)."""
    _, predictions = models["student"].forward_pretrain(images, visible_indices=visible_indices,
                                                        predict_indices=predict_indices, do_prediction=True)
    logits = models["head"](predictions)
    loss = -torch.sum(targets.float() * F.log_softmax(logits.float() / temperature, dim=-1), dim=-1)
    return loss.double().sum() / len(loss)


def random_indices(batch: int, tokens: int, visible: int, predicted: int, device):
    """Flat indices into batch x tokens, as the official collate builds them."""
    order = torch.rand(batch, tokens, device=device).argsort(dim=1)
    offsets = (torch.arange(batch, device=device) * tokens)[:, None]
    visible_idx = (order[:, :visible].sort(dim=1).values + offsets).flatten()
    predict_idx = (order[:, visible:visible + predicted] + offsets).flatten()
    return visible_idx, predict_idx


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="L/14")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--clusters", type=int, default=16384)
    parser.add_argument("--capi_dir", type=pathlib.Path, default=pathlib.Path(__file__).parent / "ref" / "capi")
    parser.add_argument("--no_compile", action="store_true")
    args = parser.parse_args()
    official = import_official_model(args.capi_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, patch = args.variant.split("/")
    width, heads, depth, predictor_depth = SIZES[size]
    patch = int(patch)

    def backbone():
        return official.EncoderDecoder(
            patch_size=patch, transformers_kwargs=dict(embed_dim=width, drop_path_rate=0.2,
                                                       block_kwargs=dict(attn_kwargs=dict(num_heads=heads))),
            encoder_kwargs=dict(depth=depth), decoder_kwargs=dict(depth=predictor_depth))

    with torch.device(device):
        student, teacher = backbone().init_weights(), backbone()
        models = torch.nn.ModuleDict(dict(
            student=student, teacher=teacher,
            head=official.L2NormLinear(width, args.clusters), teacher_head=official.L2NormLinear(width, args.clusters),
            clustering=official.OnlineClustering(width, args.clusters, bias=True, n_sk_iter=3, target_temp=0.06,
                                                 pred_temp=0.12)))
    models["teacher"].load_state_dict(models["student"].state_dict())
    for name in models:
        compute_in(models[name], torch.bfloat16)
    models["teacher"].requires_grad_(False)
    models["teacher_head"].requires_grad_(False)
    models["student"].train()
    models["teacher"].eval()
    student_params = list(models["student"].parameters()) + list(models["head"].parameters())
    ema_params = list(models["teacher"].parameters()) + list(models["teacher_head"].parameters())
    optimizer = torch.optim.AdamW(student_params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    clustering_optimizer = torch.optim.AdamW(models["clustering"].parameters(), lr=5e-5, betas=(0.9, 0.95))
    teacher_fn = torch.compile(teacher_step, dynamic=False, disable=args.no_compile)
    student_fn = torch.compile(student_step, dynamic=False, disable=args.no_compile)

    tokens = (args.res // patch) ** 2
    masked = int(0.65 * tokens)
    visible, predicted = tokens - masked, max(int(masked * 0.05), 1)
    images = torch.randn(args.batch, 3, args.res, args.res, device=device, dtype=torch.bfloat16)
    visible_idx, predict_idx = random_indices(args.batch, tokens, visible, predicted, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        clustering_optimizer.zero_grad(set_to_none=True)
        targets, clustering_loss = teacher_fn(models, images, predict_idx)
        clustering_loss.backward()
        capi_loss = student_fn(models, images, predict_idx, visible_idx, targets, 0.12)
        capi_loss.backward()
        optimizer.step()
        with torch.no_grad():
            momentum = 0.999
            torch._foreach_mul_(ema_params, momentum)
            torch._foreach_add_(ema_params, student_params, alpha=1 - momentum)
        clustering_optimizer.step()
        return capi_loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):                  # compilation and warm-up
        loss = step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    assert torch.isfinite(loss), loss
    print(f"capi_torch {args.variant} batch {args.batch}: {args.batch / elapsed:.1f} images/s, "
          f"{1e3 * elapsed:.1f} ms/step, peak {peak:.1f} GiB ({device}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
