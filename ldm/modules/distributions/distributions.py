"""The autoencoder posterior q(z|x): a diagonal Gaussian over latents."""
import torch


class DiagonalGaussianDistribution:
    """parameters: (B, 2C, h, w) = cat([mean, logvar]); logvar clamped to [-30, 20] as the reference."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean) - 30.0
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over (C, h, w): (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
