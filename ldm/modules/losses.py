"""Autoencoder training losses that need no pretrained network (LPIPS needs downloaded VGG weights)."""
from torch import nn


class ReconstructionKLLoss(nn.Module):
    """L1 (+ optional L2) reconstruction plus a small KL pull of the posterior toward N(0, I).

    Parameter-free, so an autoencoder trained with it keeps the reference state-dict keys.
    """

    def __init__(self, kl_weight=1e-6, l2_weight=0.0):
        super().__init__()
        self.kl_weight, self.l2_weight = kl_weight, l2_weight

    def forward(self, x, x_rec, posterior):
        """x, x_rec: (B, 3, H, W) in [-1, 1] -> (loss, dict of logged scalars)."""
        l1 = (x - x_rec).abs().mean()
        l2 = (x - x_rec).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()  # per input element, so weights do not depend on size
        loss = l1 + self.l2_weight * l2 + self.kl_weight * kl
        return loss, {"rec_l1": l1.detach(), "rec_l2": l2.detach(), "kl": kl.detach()}
