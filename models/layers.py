"""Small pieces shared by the networks: the positive output and token selection."""
import torch


class _PositiveOutput(torch.autograd.Function):
    """ELU(alpha=0.01) + 0.01 written as relu(x) + 0.01 exp(min(x, 0)): the same function, but
    torch's CPU ELU kernel is about 10x slower than exp and was 11% of a training step."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x.clamp(max=0)).mul_(0.01).add_(x.clamp(min=0))
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, y)  # d/dx: 1 above 0, 0.01 exp(x) = y below


def positive_output(x):
    """ELU(alpha=0.01) + 0.01 of x (any shape), as iStar/HISTEX: predictions stay above 0."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: in place, no saved tensors
        return torch.exp(x.clamp(max=0)).mul_(0.01).add_(x.clamp_(min=0))
    return _PositiveOutput.apply(x)


def output_options(config) -> dict:
    """The output keyword of a network: signed when it predicts a correction (--residual); only
    recorded when on, so states trained before the option existed keep their fingerprints."""
    return {"signed_output": True} if getattr(config, "residual", False) else {}


def output_layer(signed_output: bool):
    """The last function of a network: identity for a signed correction, else positive_output."""
    return (lambda x: x) if signed_output else positive_output


def take_tokens(x, keep):
    """x (B, T, C) -> (B, M, C) at the token indices keep (B, M)."""
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
