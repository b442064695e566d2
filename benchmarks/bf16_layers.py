"""Where bf16 autocast gains in the VQ-VAE: each convolution of the default model, fp32 vs bf16, side by side.

    python benchmarks/bf16_layers.py              # the default params.yaml VQ-VAE at its training batch
    python benchmarks/bf16_layers.py --steps 5    # quicker, noisier

Prints, per convolution (forward + backward, as in training), GFLOP/s in fp32 and in bf16 and their ratio, then
the same for two reference kernels: a large 3x3 convolution (oneDNN, forward) and a large matrix product (MKL).
The large convolution shows the CPU's own bf16 / fp32 ceiling for convolutions; a VQ-VAE training step, made of
these layers plus GroupNorm and GELU, cannot gain more than its layers do.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from train_speed import autocast, timed  # the sibling benchmark's timer (warm-up, then the mean of `steps` calls)

from vqprior.config import load_params
from vqprior.models.vqvae import VQVAE


def conv_macs(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one forward call: every output (conv) or input (transposed conv) element meets a
    kernel-sized slice of the other side's channels."""
    kh, kw = layer.kernel_size
    if isinstance(layer, nn.ConvTranspose2d):
        return x.numel() * layer.out_channels * kh * kw // layer.groups
    return y.numel() * layer.in_channels * kh * kw // layer.groups


def layer_inputs(model: VQVAE, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """Each convolution of the model with the input and output it sees on a forward pass of x."""
    seen, hooks = [], []
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(layer.register_forward_hook(lambda m, inp, out, n=name: seen.append((n, m, inp[0], out))))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def forward_backward(layer: nn.Module, x: torch.Tensor, precision: str):
    x = x.clone().requires_grad_(True)

    def step():
        with autocast(precision):
            y = layer(x)
        y.float().sum().backward()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    p = load_params(args.params)
    torch.manual_seed(0)
    batch = p.train_vqvae.train.batch_size
    model = VQVAE(p.train_vqvae.model)
    rows = []
    for name, layer, x, y in layer_inputs(model, torch.rand(batch, 1, 28, 28) * 2 - 1):
        flops = 3 * 2 * conv_macs(layer, x, y)  # forward, input gradient, weight gradient
        t32, t16 = (timed(forward_backward(layer, x, precision), args.steps) for precision in ("fp32", "bf16"))
        shape = f"{type(layer).__name__[:6]} {layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} " \
                f"@{x.shape[-1]}"
        rows.append((name, shape, flops, t32, t16))

    big_conv = nn.Conv2d(256, 256, 3, padding=1)
    xb = torch.randn(64, 256, 28, 28)
    with torch.no_grad():
        t32 = timed(lambda: big_conv(xb), args.steps)
        big16, xb16 = nn.Conv2d(256, 256, 3, padding=1).bfloat16(), xb.bfloat16()
        t16 = timed(lambda: big16(xb16), args.steps)
    rows.append(("reference", "Conv2d 256->256 k3 @28 fwd", 2 * 64 * 28 * 28 * 256 * 256 * 9, t32, t16))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()
    rows.append(("reference", "matmul 2048^3 (MKL)", 2 * 2048 ** 3,
                 timed(lambda: a @ b, args.steps), timed(lambda: a16 @ b16, args.steps)))

    print(f"\n{'layer':<22} {'convolution':<27} {'ms fp32':>8} {'ms bf16':>8} {'GFLOP/s fp32':>13} "
          f"{'GFLOP/s bf16':>13} {'bf16/fp32':>9}   (batch {batch}, {torch.get_num_threads()} threads)")
    for name, shape, flops, t32, t16 in rows:
        print(f"{name:<22} {shape:<27} {t32 * 1e3:>8.2f} {t16 * 1e3:>8.2f} {flops / t32 / 1e9:>13.0f} "
              f"{flops / t16 / 1e9:>13.0f} {t32 / t16:>8.2f}x")
    layers = [r for r in rows if r[0] != "reference"]
    t32, t16 = sum(r[3] for r in layers), sum(r[4] for r in layers)
    print(f"all VQ-VAE convolutions: {t32 * 1e3:.1f} ms fp32, {t16 * 1e3:.1f} ms bf16, {t32 / t16:.2f}x")


if __name__ == "__main__":
    main()
