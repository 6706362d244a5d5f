"""One rank of a 2-process Hugging Face Trainer run (accelerate DDP on CPU, gloo), started
by tests/test_integrations.py with ``python -m torch.distributed.run --nproc_per_node 2``.

Rank 1's GPT-2 block-1 MLP returns NaN at global step 2; each rank writes what
``trainer.train()`` raised to ``OUT_DIR/rank<R>.json``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import transformers

from healthmon.integrations.hf import HealthmonCallback


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ["RANK"])
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg)
    holder = {}

    def poison(module, args, output):
        if module.training and rank == 1 and holder["trainer"].state.global_step == 2:
            return output * float("nan")
        return None

    handle = model.transformer.h[1].mlp.register_forward_hook(poison)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"run{rank}"), max_steps=5, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[HealthmonCallback()])
    holder["trainer"] = trainer
    rec = {"type": None}
    try:
        trainer.train()
    except Exception as exc:  # what train() raised on this rank
        a = getattr(exc, "anomaly", None)
        rec = {"type": type(exc).__name__, "message": str(exc),
               "step": a.step if a else None, "site": a.site if a else None}
    handle.remove()
    rec["world"] = int(os.environ["WORLD_SIZE"])
    rec["global_step"] = trainer.state.global_step
    rec["hooks_left"] = sum(len(m._forward_hooks) for m in model.modules())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main(sys.argv[1])
