import torch
import torch.nn as nn
import healthmon

class Entropy(nn.Module):
    """Attention with an entropy bonus, written the usual way."""
    def __init__(self, d=16):
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        p = (q @ k.transpose(-1, -2)).softmax(-1)
        ent = -(p * torch.log(p)).sum(-1)
        return x * ent.unsqueeze(-1)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 16), Entropy(), nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
healthmon.watch(model, sync=True)
for step in range(100):
    x = torch.randn(8, 10, 16) * (1 + step)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
