import torch
import torch.nn as nn
import healthmon

class PairDistance(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)

    def forward(self, a, b):
        ea, eb = self.embed(a), self.embed(b)
        return torch.sqrt(((ea - eb) ** 2).sum(-1))   # 0 when a == b

torch.manual_seed(0)
model = PairDistance()
healthmon.watch(model, sync=True)
a = torch.randn(5, 4)
b = a.clone(); b[3] += 1          # only row 3 differs
loss = (model(a, b) - 1).pow(2).mean()
loss.backward()
